// What the two prefill kernels (tensor-core and fp32) share: their parameters and the mapping of
// a block to its query tile and its sequence's keys.
#pragma once

#include "device_common.cuh"

namespace skiplayers::cuda {

template <typename T>
struct PrefillParams {
  const T* q;  // [total_q, heads, D]; strides in elements
  int64_t q_token_stride, q_head_stride;
  const T* k;  // [total_k, kv_heads, D]
  int64_t k_token_stride, k_head_stride;
  const T* v;
  int64_t v_token_stride, v_head_stride;
  const int32_t* cu_seqlens_q;  // [B + 1]
  const int32_t* cu_seqlens_k;  // [B + 1]
  const int32_t* q_pos;         // [total_q]
  const int32_t* k_pos;         // [total_k]
  const int32_t* q_tag;         // [total_q] or nullptr (all 0)
  const int32_t* k_tag;         // [total_k] or nullptr
  T* out;                       // [total_q, heads, D], contiguous
  int32_t batch, heads, group;
  int64_t total_q, total_k;
  int64_t rule;
  float scale_log2;  // softmax scale * log2(e)
};

// The query tile of this block (grid: (query tiles upper bound, kv_heads)) and its keys.
struct PrefillTile {
  int64_t first_token;  // the sequence's first packed query row
  int64_t rows_in_seq;  // its query rows: tokens * group
  int64_t row0;         // first row of this tile within the sequence
  int64_t key_begin;    // the sequence's first packed key row
  int64_t keys;         // its number of keys
  int32_t kv_head;
};

// The query tile at coordinate `tc` (locate_tile; tc.seq >= 0) of tile_rows rows, for KV head
// blockIdx.y, with its sequence's keys. No checks: prefill_tile makes them, or a plan kernel did.
template <typename T>
__device__ __forceinline__ void tile_at(const PrefillParams<T>& p, TileCoord tc, int32_t tile_rows, PrefillTile* t) {
  t->first_token = p.cu_seqlens_q[tc.seq];
  t->rows_in_seq = (p.cu_seqlens_q[tc.seq + 1] - t->first_token) * p.group;
  t->row0 = static_cast<int64_t>(tc.tile) * tile_rows;
  t->key_begin = p.cu_seqlens_k[tc.seq];
  t->keys = p.cu_seqlens_k[tc.seq + 1] - t->key_begin;
  t->kv_head = blockIdx.y;
}

// Blocks take tiles in reverse order: under causality a sequence's later tiles see more keys, so
// the heaviest start first (and the blocks past the last tile, which exit at once, come first).
template <typename T>
__device__ __forceinline__ bool prefill_tile(const PrefillParams<T>& p, int32_t tile_rows, PrefillTile* t) {
  const int64_t tile = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const TileCoord tc = locate_tile(p.cu_seqlens_q, p.batch, p.group, tile_rows, tile, p.total_q);
  if (tc.seq < 0) return false;
  tile_at(p, tc, tile_rows, t);
  SKIPLAYERS_DEVICE_CHECK(p.cu_seqlens_k[0] == 0 && p.cu_seqlens_k[p.batch] == p.total_k,
                          "skiplayers::varlen_attention: cu_seqlens_k must start at 0 and end at total_k");
  SKIPLAYERS_DEVICE_CHECK(t->key_begin >= 0 && t->keys >= 0 && t->key_begin + t->keys <= p.total_k,
                          "skiplayers::varlen_attention: cu_seqlens_k must be non-decreasing");
  return true;
}

// A thread's two rows of its warp's 16-row mma tile (mma_sm80.cuh: rows warp * 16 + g and + 8, g =
// lane / 4): (token, head, valid) of each, and its token's position and tag (0 without tags). Rows
// past the sequence read token 0's metadata and are not valid.
struct FragmentRows {
  QueryRow a, b;
  int32_t pos_a, pos_b, tag_a, tag_b;
};

template <typename T>
__device__ __forceinline__ FragmentRows fragment_rows(const PrefillParams<T>& p, const PrefillTile& tile, int warp,
                                                      int g) {
  FragmentRows r;
  const int64_t row_a = tile.row0 + warp * 16 + g;
  r.a = query_row(tile.first_token, tile.rows_in_seq, row_a, p.group, tile.kv_head);
  r.b = query_row(tile.first_token, tile.rows_in_seq, row_a + 8, p.group, tile.kv_head);
  r.pos_a = p.q_pos[r.a.token];
  r.pos_b = p.q_pos[r.b.token];
  r.tag_a = p.q_tag ? p.q_tag[r.a.token] : 0;
  r.tag_b = p.q_tag ? p.q_tag[r.b.token] : 0;
  return r;
}

}  // namespace skiplayers::cuda
