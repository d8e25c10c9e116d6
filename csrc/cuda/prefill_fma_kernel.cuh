// Prefill attention (skiplayers::varlen_attention) for fp32 inputs: the same tiling, block
// skipping and online softmax as the tensor-core kernel, with fp32 FMA arithmetic throughout so
// the result stays within the fp32 tolerance (tensor cores would round inputs to tf32).
//
// Block: 4 lanes per query row, kRows rows (4 kRows threads), key blocks of kKeys keys; the
// stable generation uses 32 rows x 16 keys (128 threads), the next one FmaTile<D> below.
//   scores  lane t of a row computes keys t, t + 4, .., t + kKeys - 4 from Q and K in shared memory
//   P V     the row's probabilities go through shared memory; lane t owns output columns
//           4t + 16c .. 4t + 16c + 3 (c < D / 16)
// Rows of the shared tiles are padded by 16 bytes against bank conflicts. Static shared memory:
// 4 (kRows + 2 kKeys) (D + 4) bytes + small, so D = 256 takes 16 rows x 8 keys to stay under 48 KB.
#pragma once

#include "mma_sm80.cuh"  // cp_async_16
#include "prefill_common.cuh"

namespace skiplayers::cuda {

constexpr int kPrefillFmaThreads = 128;
constexpr int kPrefillFmaRows = 32;
constexpr int kPrefillFmaKeys = 16;

// The next generation's fp32 tile per head dim (prefill_fa2.cu): the stable one, except D = 256,
// whose 32 x 16 tile would need 66 KB of shared memory.
template <int D>
struct FmaTile {
  static constexpr int kRows = D == 256 ? 16 : kPrefillFmaRows;
  static constexpr int kKeys = D == 256 ? 8 : kPrefillFmaKeys;
  static constexpr int kThreads = 4 * kRows;
};

template <int D, int kRows = kPrefillFmaRows, int kKeys = kPrefillFmaKeys>
__global__ void __launch_bounds__(4 * kRows) prefill_fma_kernel(const PrefillParams<float> p) {
  constexpr int kThreads = 4 * kRows;
  constexpr int kStride = D + 4;
  constexpr int kN = kKeys;
  constexpr int kChunks = D / 4;  // float4 per row
  constexpr int kCols = D / 16;   // float4 output groups per lane
  static_assert(D % 16 == 0 && kN % 4 == 0 && kN <= kThreads && kThreads % 32 == 0, "fp32 tile shape");
  __shared__ alignas(16) float q_tile[kRows * kStride];
  __shared__ alignas(16) float k_tile[kN * kStride];
  __shared__ alignas(16) float v_tile[kN * kStride];
  __shared__ float p_tile[kRows][kN + 1];
  __shared__ int32_t key_pos[kN];
  __shared__ int32_t key_tag[kN];
  __shared__ BlockSummary warp_sums[kThreads / 32];

  PrefillTile tile;
  if (!prefill_tile(p, kRows, &tile)) return;
  const int tid = threadIdx.x, lane = tid & 31;
  const int row = tid / 4, t = tid % 4;

  const QueryRow qr = query_row(tile.first_token, tile.rows_in_seq, tile.row0 + row, p.group, tile.kv_head);
  const int32_t q_pos = p.q_pos[qr.token], q_tag = p.q_tag ? p.q_tag[qr.token] : 0;
  {
    const float* src = p.q + qr.token * p.q_token_stride + qr.head * p.q_head_stride;
    for (int c = t; c < kChunks; c += 4)
      cp_async_16(&q_tile[row * kStride + 4 * c], qr.valid ? src + 4 * c : p.q, qr.valid ? 16 : 0);
    cp_async_wait_all();
  }
  BlockSummary q_sum = block_summary_empty();
  if (qr.valid) block_summary_add(q_sum, q_pos, q_tag);
  q_sum = block_summary_reduce<kThreads / 32>(q_sum, warp_sums);  // barrier: q_tile is ready

  float4 acc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  float m = -INFINITY, l = 0.f;  // l: this lane's keys only

  const int32_t* kpos_seq = p.k_pos + tile.key_begin;
  const int32_t* ktag_seq = p.k_tag ? p.k_tag + tile.key_begin : nullptr;
  const float* k_seq = p.k + tile.key_begin * p.k_token_stride + tile.kv_head * p.k_head_stride;
  const float* v_seq = p.v + tile.key_begin * p.v_token_stride + tile.kv_head * p.v_head_stride;
  const float* q_row = &q_tile[row * kStride];

  for (int64_t kb = 0; kb < tile.keys; kb += kN) {
    const int n = static_cast<int>(tile.keys - kb < kN ? tile.keys - kb : kN);
    const BlockSummary k_sum = warp_key_summary(kpos_seq + kb, ktag_seq ? ktag_seq + kb : nullptr, n, lane);
    if (!block_may_be_visible(p.rule, q_sum, k_sum)) continue;  // uniform: K/V never loaded
    const bool full = n == kN && block_fully_visible(p.rule, q_sum, k_sum);

    __syncthreads();  // previous block's tiles fully consumed
    for (int c = tid; c < kN * kChunks; c += kThreads) {
      const int key = c / kChunks, ch = c % kChunks;
      const bool in = key < n;
      const int64_t r = kb + (in ? key : 0);
      cp_async_16(&k_tile[key * kStride + 4 * ch], k_seq + r * p.k_token_stride + 4 * ch, in ? 16 : 0);
      cp_async_16(&v_tile[key * kStride + 4 * ch], v_seq + r * p.v_token_stride + 4 * ch, in ? 16 : 0);
    }
    if (tid < kN) {
      key_pos[tid] = tid < n ? kpos_seq[kb + tid] : 0;
      key_tag[tid] = (tid < n && ktag_seq) ? ktag_seq[kb + tid] : 0;
    }
    cp_async_wait_all();
    __syncthreads();

    float s[kN / 4];
#pragma unroll
    for (int j = 0; j < kN / 4; ++j) s[j] = 0.f;
#pragma unroll 4
    for (int d = 0; d < D; d += 4) {
      const float4 qv = *reinterpret_cast<const float4*>(q_row + d);
#pragma unroll
      for (int j = 0; j < kN / 4; ++j) {
        const float4 kv = *reinterpret_cast<const float4*>(&k_tile[(t + 4 * j) * kStride + d]);
        s[j] = fmaf(qv.x, kv.x, fmaf(qv.y, kv.y, fmaf(qv.z, kv.z, fmaf(qv.w, kv.w, s[j]))));
      }
    }

    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kN / 4; ++j) {
      const int key = t + 4 * j;
      float x = s[j] * p.scale_log2;
      if (!full) {
        const bool visible = key < n && qr.valid && key_visible(p.rule, q_pos, q_tag, key_pos[key], key_tag[key]);
        x = visible ? x : -INFINITY;
      }
      s[j] = x;
      mx = fmaxf(mx, x);
    }
    mx = group_max<4>(mx);
    const float m_new = fmaxf(m, mx);
    const float shift = m_new == -INFINITY ? 0.f : m_new;  // see the tensor-core kernel
    const float alpha = exp2f(m - shift);
    m = m_new;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kN / 4; ++j) {
      const float pj = exp2f(s[j] - shift);
      sum += pj;
      p_tile[row][t + 4 * j] = pj;
    }
    l = l * alpha + sum;
    __syncwarp();  // the row's 4 lanes share a warp

#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      acc[c].x *= alpha;
      acc[c].y *= alpha;
      acc[c].z *= alpha;
      acc[c].w *= alpha;
    }
#pragma unroll 4
    for (int j = 0; j < kN; ++j) {
      const float pj = p_tile[row][j];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const float4 vv = *reinterpret_cast<const float4*>(&v_tile[j * kStride + 4 * t + 16 * c]);
        acc[c].x = fmaf(pj, vv.x, acc[c].x);
        acc[c].y = fmaf(pj, vv.y, acc[c].y);
        acc[c].z = fmaf(pj, vv.z, acc[c].z);
        acc[c].w = fmaf(pj, vv.w, acc[c].w);
      }
    }
  }

  l = group_sum<4>(l);
  if (!qr.valid) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;  // no visible key: zeros
  float* out = p.out + (qr.token * p.heads + qr.head) * D + 4 * t;
#pragma unroll
  for (int c = 0; c < kCols; ++c)
    *reinterpret_cast<float4*>(out + 16 * c) =
        make_float4(acc[c].x * inv, acc[c].y * inv, acc[c].z * inv, acc[c].w * inv);
}

}  // namespace skiplayers::cuda
