// Index math for packed ragged batches and paged per-sequence caches, shared by the CPU and CUDA kernels.
//
// Conventions (flash-attn's and vLLM's):
//   packed activations  [total_tokens, H, D], sequence b owns rows cu_seqlens[b] .. cu_seqlens[b+1]-1
//   paged caches        pools [num_pages, page_size, H_kv, D]; sequence b owns slots 0 .. cache_seqlens[b]-1,
//                       slot s in page block_table[b, s / page_size] at offset s % page_size
// Query head h reads KV head h / (H / H_kv) (grouped-query attention, no repeat_kv).
#pragma once

#include <cmath>
#include <cstdint>

#include "skiplayers/visibility.h"

namespace skiplayers {

SKIPLAYERS_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

SKIPLAYERS_HD int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The sequence that owns packed row `row`: the largest b with cu_seqlens[b] <= row.
// Empty sequences (cu_seqlens[b] == cu_seqlens[b+1]) never own a row.
SKIPLAYERS_HD int32_t sequence_of_row(const int32_t* cu_seqlens, int32_t batch, int64_t row) {
  int32_t lo = 0, hi = batch;  // invariant: cu_seqlens[lo] <= row < cu_seqlens[hi]
  while (hi - lo > 1) {
    const int32_t mid = lo + (hi - lo) / 2;  // no int32 overflow past 2^30 sequences
    if (cu_seqlens[mid] <= row) lo = mid; else hi = mid;
  }
  return lo;
}

// The KV head that query head `q_head` reads.
SKIPLAYERS_HD int32_t kv_head_of(int32_t q_head, int32_t num_q_heads, int32_t num_kv_heads) {
  return q_head / (num_q_heads / num_kv_heads);
}

// Flat slot index of sequence slot `slot` in a pool viewed as [num_pages * page_size, ...]:
// page block_table_row[slot / page_size], offset slot % page_size.
SKIPLAYERS_HD int64_t paged_slot(const int32_t* block_table_row, int64_t page_size, int64_t slot) {
  return static_cast<int64_t>(block_table_row[slot / page_size]) * page_size + slot % page_size;
}

// Query tiles of packed ragged queries (GPU kernels). A tile holds `tile_rows` rows of one
// sequence and one KV head; rows flatten (token, query head of the KV head's group):
//   row r of sequence b  ->  token cu_seqlens[b] + r / group,  query head kv_head * group + r % group
// so the query heads that share a KV head are processed together and K/V is read once for them.
SKIPLAYERS_HD int64_t tiles_of_sequence(int64_t tokens, int64_t group, int64_t tile_rows) {
  return ceil_div(tokens * group, tile_rows);
}

// An upper bound of sum_b tiles_of_sequence(tokens_b) that needs only total_tokens = sum_b tokens_b
// (known on the host without reading cu_seqlens): sum_b ceil(x_b / t) <= floor(sum_b (x_b + t - 1) / t).
SKIPLAYERS_HD int64_t tiles_upper_bound(int64_t total_tokens, int64_t batch, int64_t group, int64_t tile_rows) {
  return (total_tokens * group + batch * (tile_rows - 1)) / tile_rows;
}

// Split-K (flash-decoding): key range [0, length) cut into `num_splits` pieces whose boundaries
// fall on multiples of `block`. Piece `split` is [*begin, *end); trailing pieces may be empty.
SKIPLAYERS_HD void split_key_range(int64_t length, int64_t num_splits, int64_t split, int64_t block,
                                   int64_t* begin, int64_t* end) {
  const int64_t blocks = ceil_div(length, block);
  const int64_t per_split = ceil_div(blocks, num_splits);
  int64_t b = split * per_split * block;
  int64_t e = (split + 1) * per_split * block;
  b = b < length ? b : length;
  e = e < length ? e : length;
  *begin = b;
  *end = e;
}

// Splits actually used for a cache of `length` keys: `num_splits`, but no more than one split per
// `min_keys` keys (min_keys = 1 keeps num_splits as given). At least 1, so an empty cache still
// produces one (empty) partial result.
SKIPLAYERS_HD int64_t effective_splits(int64_t length, int64_t num_splits, int64_t min_keys) {
  const int64_t by_length = ceil_div(length, min_keys);
  const int64_t s = num_splits < by_length ? num_splits : by_length;
  return s > 1 ? s : 1;
}

// Online-softmax merge of two partial results over disjoint key sets, in base 2:
// (m, l) are the running max of the log2-scaled scores and the sum of exp2(score - m).
// Returns the factors that rescale each side's accumulator; writes the merged (m, l).
struct MergeFactors {
  float a;
  float b;
};

SKIPLAYERS_HD MergeFactors merge_softmax_stats(float m_a, float l_a, float m_b, float l_b, float* m_out,
                                               float* l_out) {
  const float m = m_a > m_b ? m_a : m_b;
  if (m == -INFINITY) {  // neither side saw a visible key
    *m_out = m;
    *l_out = 0.f;
    return MergeFactors{0.f, 0.f};
  }
  const MergeFactors f{exp2f(m_a - m), exp2f(m_b - m)};
  *m_out = m;
  *l_out = l_a * f.a + l_b * f.b;
  return f;
}

}  // namespace skiplayers
