// Thin wrappers over the sm_80+ instructions the tensor-core prefill kernels use: cp.async
// (global -> shared without registers), ldmatrix (shared -> mma fragments) and
// mma.sync.m16n8k16 with fp16 / bf16 inputs and fp32 accumulators.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4:
//   A 16x16 (row-major), 4 x b32: a0 (row g, cols 2t..2t+1), a1 (row g+8, same cols),
//                                 a2 (row g, cols 2t+8..), a3 (row g+8, cols 2t+8..)
//   B 16x8 (col-major),  2 x b32: b0 (rows 2t..2t+1, col g), b1 (rows 2t+8.., col g)
//   C 16x8 fp32,         4 x f32: c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, same cols)
// The lower 16 bits of a b32 register hold the element with the smaller column (A) / row (B) index.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "skiplayers' CUDA kernels need sm_80 or newer: set TORCH_CUDA_ARCH_LIST to 8.0 or above"
#endif

namespace skiplayers::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy; `src_bytes` = 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(void* dst_smem, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst_smem)), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");  // shared-memory reads stay after the wait
}

// 4-byte asynchronous copy (through L1); `src_bytes` = 0 writes 4 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_4(void* dst_smem, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst_smem)), "l"(src),
               "r"(src_bytes));
}

// Closes the group of this thread's cp.async copies issued since the last commit (an empty group
// when there were none, which completes at once).
__device__ __forceinline__ void cp_async_commit_group() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `kPending` of this thread's committed groups are still in flight (the most
// recent ones). Other threads' copies need a barrier after it to be visible.
template <int kPending>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i. Lane l receives, of
// each matrix, row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 (the A / B fragment layout above).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_addr)));
}

// As ldmatrix_x4, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_addr)));
}

// c += a * b for one m16n8k16 tile.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one b32 of two 16-bit values (`lo` in the lower half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// The online softmax's rescale of a warp's 16-row accumulator tile (acc[i] = c0..c3, the C layout
// above): rows g (c0, c1) times `a`, rows g + 8 (c2, c3) times `b`.
template <int N>
__device__ __forceinline__ void scale_accumulator_rows(float (&acc)[N][4], float a, float b) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    acc[i][0] *= a;
    acc[i][1] *= a;
    acc[i][2] *= b;
    acc[i][3] *= b;
  }
}

// O += P V over 16 keys, for a warp's 16 rows: `p0` / `p1` the fp32 probabilities of keys 0-7 / 8-15
// (two S tiles in the C layout), repacked to T as the A operand; `v` the first of the 16 V rows in
// shared memory (D elements each, `stride` elements apart), read as B fragments by ldmatrix.trans
// (matrices: keys 0-7 / 8-15 of columns 8 nd .. 8 nd + 7, then of 8 nd + 8 .. 8 nd + 15).
template <typename T, int D>
__device__ __forceinline__ void mma_pv_16_keys(float (&o)[D / 8][4], const float (&p0)[4], const float (&p1)[4],
                                               const T* v, int stride, int lane) {
  const uint32_t pa[4] = {pack2<T>(p0[0], p0[1]), pack2<T>(p0[2], p0[3]), pack2<T>(p1[0], p1[1]),
                          pack2<T>(p1[2], p1[3])};
#pragma unroll
  for (int nd = 0; nd < D / 8; nd += 2) {
    uint32_t bf[4];
    ldmatrix_x4_trans(bf, v + ((lane & 7) + ((lane >> 3) & 1) * 8) * stride + nd * 8 + (lane >> 4) * 8);
    mma_16816<T>(o[nd], pa, bf[0], bf[1]);
    mma_16816<T>(o[nd + 1], pa, bf[2], bf[3]);
  }
}

}  // namespace skiplayers::cuda
