// What both generations of the decode kernels (skiplayers::cache_attention) share: the parameter
// struct, the work of one block (sequence, query rows, the split's key range) with the device-side
// checks of the metadata, the resolution of a key's slot through the block table, and the kernel
// that merges the splits' partial results.
//
//   stable  decode_split_kernel (decode_kernel.cuh): FMA kernel, all dtypes (next: fp32 only)
//   next    decode_mma_kernel (decode_mma_kernel.cuh): tensor cores, fp16 / bf16
//
// Split-K (flash-decoding): the keys of each sequence are cut into splits; every (query tile, KV
// head, split) is one block. With one split the block writes the normalised output; with several
// it writes its unnormalised partial (acc, m, l) and decode_combine_kernel merges them.
#pragma once

#include <cuda_runtime.h>

#include "device_common.cuh"

namespace skiplayers::cuda {

constexpr int kDecodeSplitBlock = 64;  // split boundaries fall on multiples of this many keys
constexpr int kDecodeMmaRows = 16;     // query rows of a decode_mma_kernel block (one mma row tile)

template <typename T>
struct DecodeParams {
  const T* q;  // [total_q, heads, D]; strides in elements
  int64_t q_token_stride, q_head_stride;
  // K/V pools [num_pages, page_size, kv_heads, D], addressed by flat slot page * page_size + offset
  // (the launcher guarantees pages are page_size slot strides apart, and 16-byte aligned rows).
  const T* k_cache;
  const T* v_cache;
  int64_t k_slot_stride, k_head_stride;
  int64_t v_slot_stride, v_head_stride;
  const int32_t* block_table;    // [B, max_pages], contiguous
  const int32_t* cu_seqlens_q;   // [B + 1]
  const int32_t* cache_seqlens;  // [B]
  const int32_t* q_pos;          // [total_q]
  const int32_t* q_tag;          // [total_q] or nullptr
  const int32_t* pos_cache;      // [num_pages, page_size], contiguous (indexed by flat slot)
  const int32_t* tag_cache;      // [num_pages, page_size], contiguous, or nullptr
  T* out;                        // [total_q, heads, D], contiguous
  float* part_acc;               // [num_splits, total_q, heads, D]  (num_splits > 1 only)
  float* part_m;                 // [num_splits, total_q, heads]
  float* part_l;                 // [num_splits, total_q, heads]
  int32_t batch, heads, group;
  int32_t max_pages, page_size;
  int32_t capacity;    // max_pages * page_size: the most slots a sequence can hold
  int32_t pool_slots;  // num_pages * page_size: flat slots of the pools
  int64_t total_q;
  int64_t rule;
  float scale_log2;  // softmax scale * log2(e)
  int32_t num_splits;
  int32_t min_keys_per_split;  // effective_splits(): 1 keeps num_splits as given
};

// The work of one block: its sequence's query rows and the key range of its split.
struct DecodeWork {
  int64_t first_token;  // the sequence's first packed query row
  int64_t rows_in_seq;  // its rows: query tokens * group
  int64_t row0;         // first row of this block's tile within the sequence
  int64_t key_begin;    // the split's slots [key_begin, key_end) of the sequence
  int64_t key_end;
  const int32_t* table_row;  // the sequence's block table row
};

// The block's work for tile `tc` (locate_tile) and split `split`, after checking the sequence's cache
// length on the device. False when the split is past the sequence's effective splits (the block has
// nothing to do: the combine kernel reads the first effective_splits() partials only).
template <typename T>
__device__ __forceinline__ bool decode_work(const DecodeParams<T>& p, TileCoord tc, int32_t tile_rows, int32_t split,
                                            DecodeWork* w) {
  const int32_t b = tc.seq;
  const int32_t length = p.cache_seqlens[b];
  SKIPLAYERS_DEVICE_CHECK(length >= 0 && length <= p.capacity,
                          "skiplayers::cache_attention: cache_seqlens[b] is outside [0, max_pages * page_size]");
  const int64_t splits = effective_splits(length, p.num_splits, p.min_keys_per_split);
  if (split >= splits) return false;
  split_key_range(length, splits, split, kDecodeSplitBlock, &w->key_begin, &w->key_end);
  w->first_token = p.cu_seqlens_q[b];
  w->rows_in_seq = (p.cu_seqlens_q[b + 1] - w->first_token) * p.group;
  w->row0 = static_cast<int64_t>(tc.tile) * tile_rows;
  w->table_row = p.block_table + static_cast<int64_t>(b) * p.max_pages;
  return true;
}

// ---- slots through the block table (ragged.h paged_slot, in two steps so that a kernel can have the
// block table load of a key in flight before the pos / tag loads that depend on it) -----------------

// `Index` is the kernel's key index type (int32_t or int64_t: j < capacity < 2^31, launcher check);
// the 32-bit division is the cheaper one.

// The block table entry of slot j of a sequence (j < its cache length: entries past a sequence's
// pages are never read; they may be unassigned, -1).
template <typename Index>
__device__ __forceinline__ int32_t key_page(const int32_t* table_row, int32_t page_size, Index j) {
  return table_row[j / page_size];
}

// The flat slot of slot j in page `page`, checked to lie in the pools: page * page_size + offset is
// in [0, pool_slots) exactly when the page is in [0, num_pages).
template <typename Index>
__device__ __forceinline__ int32_t key_slot(int32_t page, int32_t page_size, int32_t pool_slots, Index j) {
  const int64_t slot = static_cast<int64_t>(page) * page_size + j % page_size;
  SKIPLAYERS_DEVICE_CHECK(slot >= 0 && slot < pool_slots,
                          "skiplayers::cache_attention: a block_table entry of a slot in use is not a page of the pool");
  return static_cast<int32_t>(slot);
}

// ---- the combine step --------------------------------------------------------------------------

// Merges the splits of every (query token, head): one warp per output row.
// grid: ceil(total_q * heads / kCombineWarps) blocks of kCombineWarps warps.
constexpr int kCombineWarps = 4;

template <typename T, int D>
__global__ void __launch_bounds__(kCombineWarps * 32) decode_combine_kernel(const DecodeParams<T> p) {
  static_assert(D % 32 == 0, "a warp merges a row, D / 32 elements per lane");
  constexpr int kPerLane = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t out_row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (out_row >= p.total_q * p.heads) return;
  const int64_t token = out_row / p.heads;
  const int32_t b = sequence_of_row(p.cu_seqlens_q, p.batch, token);
  const int64_t splits = effective_splits(p.cache_seqlens[b], p.num_splits, p.min_keys_per_split);

  float m = -INFINITY, l = 0.f, acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.f;
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t part_row = s * p.total_q * p.heads + out_row;
    float m_new, l_new;
    const MergeFactors f = merge_softmax_stats(m, l, p.part_m[part_row], p.part_l[part_row], &m_new, &l_new);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] = acc[i] * f.a + p.part_acc[part_row * D + lane + 32 * i] * f.b;
    m = m_new;
    l = l_new;
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;  // no visible key: zeros
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) p.out[out_row * D + lane + 32 * i] = from_float<T>(acc[i] * inv);
}

// ---- the next generation's tensor-core kernel (decode_mma.cu), for the launcher ----------------

// Blocks of the tensor-core decode at head dim D resident on one SM of the current device (occupancy from its
// registers and dynamic shared memory; also opts the kernel in to that shared memory). Cached per
// device: the first call, outside any graph capture, queries the runtime.
template <typename T, int D>
int decode_mma_blocks_per_sm();

// Launches decode_mma_kernel<T, D> on grid (tiles_upper_bound(.., kDecodeMmaRows), kv_heads,
// p.num_splits); the launcher adds the combine kernel when p.num_splits > 1.
template <typename T, int D>
void launch_decode_mma(const DecodeParams<T>& p, int64_t kv_heads, cudaStream_t stream);

}  // namespace skiplayers::cuda
