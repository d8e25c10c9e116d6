// Device helpers shared by the CUDA kernels of skiplayers: dtype conversion and 128-bit loads,
// warp reductions, the query-tile locator and device-side metadata checks. Raw pointers only;
// the index math itself lives in the torch-free headers csrc/include/skiplayers/ (shared with the
// CPU kernels, which run and are tested everywhere).
#pragma once

#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT_MSG: header-only, active even with NDEBUG
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "skiplayers/ragged.h"

// Device-side check of metadata *values* (cu_seqlens, cache lengths) that the host cannot read
// without a synchronisation. A violation stops the kernel with a device-side assertion naming the
// condition; the CUDA context is unusable afterwards (as with any device-side assert).
#define SKIPLAYERS_DEVICE_CHECK(cond, msg) CUDA_KERNEL_ASSERT_MSG(cond, msg)

namespace skiplayers::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- dtype conversion ------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements of T in one 128-bit vector.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// 16 bytes (kVec16<T> elements) as floats. `raw` holds the bytes as loaded.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&out)[kVec16<T>]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec16<T>; ++i) out[i] = to_float(e[i]);
}

// Read-only 128-bit global load (the address must be 16-byte aligned; launchers guarantee it).
__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// load16(p) where `pred` holds, zeros elsewhere, as one predicated load (`@p ld.global.nc`): never
// a branch around the load, so the loads of a tile issue back to back and `p` is not dereferenced
// where `pred` is false (it may then be any address).
__device__ __forceinline__ uint4 load16_if(const void* p, bool pred) {
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
  asm("{\n"
      "  .reg .pred q;\n"
      "  setp.ne.b32 q, %5, 0;\n"
      "  @q ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      "}\n"
      : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w)
      : "l"(p), "r"(static_cast<int>(pred)));
  return r;
}

// ---- warp reductions -------------------------------------------------------------------------

// Sum / max over aligned groups of `width` lanes (width a power of two <= 32).
template <int width>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int off = width / 2; off > 0; off /= 2) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

template <int width>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int off = width / 2; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, off));
  return x;
}

// Block summary reduced over all 32 lanes of a warp (every lane gets the result).
__device__ __forceinline__ BlockSummary warp_summary(BlockSummary s) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    BlockSummary o;
    o.min_pos = __shfl_xor_sync(kFullMask, s.min_pos, off);
    o.max_pos = __shfl_xor_sync(kFullMask, s.max_pos, off);
    o.min_sentence = __shfl_xor_sync(kFullMask, s.min_sentence, off);
    o.max_sentence = __shfl_xor_sync(kFullMask, s.max_sentence, off);
    o.min_anchor_sentence = __shfl_xor_sync(kFullMask, s.min_anchor_sentence, off);
    o.any_sink = __shfl_xor_sync(kFullMask, static_cast<int>(s.any_sink), off) != 0;
    o.any_non_context = __shfl_xor_sync(kFullMask, static_cast<int>(s.any_non_context), off) != 0;
    s = block_summary_merge(s, o);
  }
  return s;
}

// Summary of the keys [0, n) of a run (`pos`, `tag` may be nullptr = all tags 0), computed by one
// warp. Every warp of a block can call it on the same keys and gets the same answer, so a block
// decides to skip a key block without shared memory or a barrier.
__device__ __forceinline__ BlockSummary warp_key_summary(const int32_t* pos, const int32_t* tag, int n, int lane) {
  BlockSummary s = block_summary_empty();
  for (int j = lane; j < n; j += 32) block_summary_add(s, pos[j], tag ? tag[j] : 0);
  return warp_summary(s);
}

// Summary reduced over a whole block of kWarps warps (every thread gets the result); `scratch` is
// shared memory for kWarps summaries. Contains a barrier: call it from every thread.
template <int kWarps>
__device__ __forceinline__ BlockSummary block_summary_reduce(BlockSummary s, BlockSummary* scratch) {
  s = warp_summary(s);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x / 32] = s;
  __syncthreads();
  BlockSummary all = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) all = block_summary_merge(all, scratch[w]);
  return all;
}

// ---- query tiles -----------------------------------------------------------------------------

struct TileCoord {
  int32_t seq;   // -1: past the last tile
  int32_t tile;  // index of the tile within its sequence
};

// Which (sequence, tile) global tile `tile` is, when sequence b contributes
// tiles_of_sequence(tokens_b, group, tile_rows) tiles in order (ragged.h). Run by a full warp
// (every lane gets the answer): 32 sequences per step, a warp scan of their tile counts.
// Also checks cu_seqlens on the device: starts at 0, non-decreasing, ends at total_tokens.
__device__ __forceinline__ TileCoord locate_tile(const int32_t* cu_seqlens, int32_t batch, int32_t group,
                                                 int32_t tile_rows, int64_t tile, int64_t total_tokens) {
  const int lane = threadIdx.x & 31;
  SKIPLAYERS_DEVICE_CHECK(cu_seqlens[0] == 0 && cu_seqlens[batch] == total_tokens,
                          "skiplayers: cu_seqlens must start at 0 and end at the number of packed rows");
  int64_t before = 0;  // tiles of the sequences already passed
  for (int32_t b0 = 0; b0 < batch; b0 += 32) {
    const int32_t b = b0 + lane;
    int64_t n = 0;
    if (b < batch) {
      const int32_t tokens = cu_seqlens[b + 1] - cu_seqlens[b];
      SKIPLAYERS_DEVICE_CHECK(tokens >= 0, "skiplayers: cu_seqlens must be non-decreasing");
      n = tiles_of_sequence(tokens, group, tile_rows);
    }
    int64_t inclusive = n;  // warp inclusive scan of the counts
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int64_t o = __shfl_up_sync(kFullMask, inclusive, off);
      if (lane >= off) inclusive += o;
    }
    const int64_t chunk_total = __shfl_sync(kFullMask, inclusive, 31);
    if (tile < before + chunk_total) {
      const unsigned owners = __ballot_sync(kFullMask, before + inclusive > tile);
      const int owner = __ffs(owners) - 1;  // first lane whose sequence reaches past `tile`
      const int64_t start = before + __shfl_sync(kFullMask, inclusive - n, owner);
      return TileCoord{b0 + owner, static_cast<int32_t>(tile - start)};
    }
    before += chunk_total;
  }
  return TileCoord{-1, 0};
}

// A row of a query tile (ragged.h): token and query head.
struct QueryRow {
  int64_t token;  // packed query row
  int32_t head;   // query head
  bool valid;     // false past the sequence's last row
};

__device__ __forceinline__ QueryRow query_row(int64_t first_token, int64_t rows_in_seq, int64_t row, int32_t group,
                                              int32_t kv_head) {
  QueryRow r;
  r.valid = row < rows_in_seq;
  const int64_t rr = r.valid ? row : 0;
  r.token = first_token + rr / group;
  r.head = kv_head * group + static_cast<int32_t>(rr % group);
  return r;
}

}  // namespace skiplayers::cuda
