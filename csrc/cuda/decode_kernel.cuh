// Decode attention (skiplayers::cache_attention): a few queries per sequence over paged KV caches
// of different lengths. Flash-decoding: the keys of each sequence are cut into splits (split-K),
// every (query tile, KV head, split) is one block, and a second kernel merges the splits' partial
// softmax results.
//
// Work of one block (kThreads threads):
//   rows   up to ROWS rows of one sequence and one KV head; row r flattens (token r / G, query head
//          kv_head * G + r % G) (ragged.h), so the G query heads that share a KV head are processed
//          together and each key/value row is read once for all of them (GQA packing).
//   keys   the split's key range [begin, end) of the sequence's slots, in steps of kStep keys.
//          kLanesPerKey lanes share one key: each loads one 128-bit vector of the key (and value)
//          row, so a key row is one coalesced access; the block's kKeyGroups lane groups take keys
//          round-robin, kUnroll keys in flight per group.
//   pages  slot j of the sequence is flat slot paged_slot(block_table[b], page_size, j) of the pools
//          (ragged.h; any page size, pages in any order). Each warp resolves the keys of its lane
//          groups for a step once, one lane per key (KeyMeta: the flat slot and which rows see the
//          key), one step ahead, and hands them to the lane groups with shuffles: the block table and
//          pos/tag loads of step i + 1 are in flight with the K/V loads of step i, and every K and
//          V load of a step is issued before the first use of any of them.
//   skip   a key invisible to every row of the block (visibility.h) is never loaded.
//   state  each lane group keeps an online softmax (base 2) per row; at the end the groups are
//          merged through shared memory and the block writes the normalised output (one split) or
//          its unnormalised partial (acc, m, l) for the combine kernel.
#pragma once

#include "device_common.cuh"

namespace skiplayers::cuda {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeSplitBlock = 64;  // split boundaries fall on multiples of this many keys

template <typename T>
struct DecodeParams {
  const T* q;  // [total_q, heads, D]; strides in elements
  int64_t q_token_stride, q_head_stride;
  // K/V pools [num_pages, page_size, kv_heads, D], addressed by flat slot page * page_size + offset
  // (the launcher guarantees pages are page_size slot strides apart).
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

template <typename T, int D>
struct DecodeShape {
  static constexpr int kVec = kVec16<T>;               // elements per lane per key row
  static constexpr int kLanesPerKey = D / kVec;        // 8 / 16 (16-bit), 16 / 32 (fp32)
  static constexpr int kKeyGroups = kDecodeThreads / kLanesPerKey;
  static constexpr int kGroupsPerWarp = 32 / kLanesPerKey;
  static constexpr int kUnroll = 2;                    // keys in flight per lane group
  static constexpr int kStep = kKeyGroups * kUnroll;   // keys of the block per step
  static constexpr int kKeysPerWarp = kGroupsPerWarp * kUnroll;  // keys of one warp per step
  static_assert(kLanesPerKey <= 32 && 32 % kLanesPerKey == 0, "a key row must fit a warp");
  static_assert(kKeysPerWarp <= 32, "a warp resolves its keys of a step one lane per key");
};

// One key as the lane that resolved it hands it on: where it lies and which rows of the tile see it.
struct KeyMeta {
  int32_t slot;   // flat slot of the pools (valid only where rows != 0)
  uint32_t rows;  // bit r: row r sees the key; 0: the key is not loaded
};

// Key j of a step resolved by one lane: its page through the block table row (checked to be a page
// of the pool), then its pos / tag and the rows of the tile that see it. Keys at or past key_end
// (outside the split, or past the sequence's length) are never touched: their block table entries
// may be unassigned (-1).
template <int ROWS>
__device__ __forceinline__ KeyMeta resolve_key(const int32_t* table_row, int32_t page_size, int32_t pool_slots,
                                               const int32_t* pos_cache, const int32_t* tag_cache, int64_t rule,
                                               int64_t j, int64_t key_end, bool resolver, const int32_t (&q_pos)[ROWS],
                                               const int32_t (&q_tag)[ROWS], const bool (&row_valid)[ROWS]) {
  KeyMeta m{0, 0u};
  if (resolver && j < key_end) {
    const int64_t slot = paged_slot(table_row, page_size, j);
    // page = slot / page_size is in [0, num_pages) exactly when slot is in [0, pool_slots).
    SKIPLAYERS_DEVICE_CHECK(slot >= 0 && slot < pool_slots,
                            "skiplayers::cache_attention: a block_table entry of a slot in use is not a page of the pool");
    const int32_t kp = pos_cache[slot];
    const int32_t kt = tag_cache ? tag_cache[slot] : 0;
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      if (row_valid[r] && key_visible(rule, q_pos[r], q_tag[r], kp, kt)) m.rows |= 1u << r;
    m.slot = static_cast<int32_t>(slot);
  }
  return m;
}

// grid: (query tiles upper bound, kv_heads, num_splits)
template <typename T, int D, int ROWS>
__global__ void __launch_bounds__(kDecodeThreads) decode_split_kernel(const DecodeParams<T> p) {
  using S = DecodeShape<T, D>;
  constexpr int kVec = S::kVec;
  static_assert(ROWS <= 32, "row visibility is a 32-bit mask");
  __shared__ float sm_acc[S::kKeyGroups][ROWS][D];
  __shared__ float sm_m[S::kKeyGroups][ROWS];
  __shared__ float sm_l[S::kKeyGroups][ROWS];
  __shared__ float sm_factor[S::kKeyGroups][ROWS];
  __shared__ float sm_total_l[ROWS];

  const TileCoord tc = locate_tile(p.cu_seqlens_q, p.batch, p.group, ROWS, blockIdx.x, p.total_q);
  if (tc.seq < 0) return;
  const int32_t b = tc.seq;
  const int32_t kv_head = blockIdx.y;
  const int32_t split = blockIdx.z;

  const int32_t length = p.cache_seqlens[b];
  SKIPLAYERS_DEVICE_CHECK(length >= 0 && length <= p.capacity,
                          "skiplayers::cache_attention: cache_seqlens[b] is outside [0, max_pages * page_size]");
  const int64_t splits = effective_splits(length, p.num_splits, p.min_keys_per_split);
  if (split >= splits) return;  // the combine kernel reads the first `splits` partials only
  int64_t key_begin, key_end;
  split_key_range(length, splits, split, kDecodeSplitBlock, &key_begin, &key_end);

  const int64_t first_token = p.cu_seqlens_q[b];
  const int64_t rows_in_seq = (p.cu_seqlens_q[b + 1] - first_token) * p.group;
  const int64_t row0 = static_cast<int64_t>(tc.tile) * ROWS;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x / 32;
  const int key_group = threadIdx.x / S::kLanesPerKey;
  const int sub = threadIdx.x % S::kLanesPerKey;  // which 128-bit vector of the row this lane holds

  // Queries, pre-scaled by scale * log2(e) so the softmax runs in base 2.
  float q[ROWS][kVec];
  int32_t q_pos[ROWS], q_tag[ROWS];
  bool row_valid[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const QueryRow qr = query_row(first_token, rows_in_seq, row0 + r, p.group, kv_head);
    row_valid[r] = qr.valid;
    q_pos[r] = p.q_pos[qr.token];
    q_tag[r] = p.q_tag ? p.q_tag[qr.token] : 0;
    if (qr.valid) {
      unpack16<T>(load16(p.q + qr.token * p.q_token_stride + qr.head * p.q_head_stride + sub * kVec), q[r]);
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[r][e] *= p.scale_log2;
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[r][e] = 0.f;
    }
  }

  float m[ROWS], l[ROWS], acc[ROWS][kVec];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[r][e] = 0.f;
  }

  const T* k_base = p.k_cache + kv_head * p.k_head_stride + sub * kVec;
  const T* v_base = p.v_cache + kv_head * p.v_head_stride + sub * kVec;
  const int32_t* table_row = p.block_table + static_cast<int64_t>(b) * p.max_pages;

  // Lane `lane` < kKeysPerWarp of a warp resolves key (u, g) = (lane / kGroupsPerWarp, lane %
  // kGroupsPerWarp) of the warp's lane groups: key begin + step * kStep + u * kKeyGroups + the
  // block-wide group index. The lane group g of the warp at unroll u reads it from that lane.
  const bool resolver = lane < S::kKeysPerWarp;
  const int64_t resolver_offset =
      (lane / S::kGroupsPerWarp) * S::kKeyGroups + warp * S::kGroupsPerWarp + lane % S::kGroupsPerWarp;
  auto resolve = [&](int64_t step) {
    return resolve_key<ROWS>(table_row, p.page_size, p.pool_slots, p.pos_cache, p.tag_cache, p.rule,
                             key_begin + step * S::kStep + resolver_offset, key_end, resolver, q_pos, q_tag,
                             row_valid);
  };

  // Every lane of a warp runs the same number of steps (the shuffles below need the full warp).
  const int64_t steps = ceil_div(key_end - key_begin, S::kStep);
  KeyMeta meta = resolve(0);
  for (int64_t step = 0; step < steps; ++step) {
    // This step's keys of this lane group, then all their K and V loads (invisible keys: none).
    int32_t slot[S::kUnroll];
    uint32_t rows[S::kUnroll];
#pragma unroll
    for (int u = 0; u < S::kUnroll; ++u) {
      const int src = u * S::kGroupsPerWarp + (lane / S::kLanesPerKey);
      slot[u] = __shfl_sync(kFullMask, meta.slot, src);
      rows[u] = __shfl_sync(kFullMask, meta.rows, src);
    }
    // Predicated loads, not a branch: an invisible key (rows == 0) is not read, and its slot is 0.
    uint4 k_raw[S::kUnroll], v_raw[S::kUnroll];
#pragma unroll
    for (int u = 0; u < S::kUnroll; ++u) {
      k_raw[u] = load16_if(k_base + static_cast<int64_t>(slot[u]) * p.k_slot_stride, rows[u] != 0u);
      v_raw[u] = load16_if(v_base + static_cast<int64_t>(slot[u]) * p.v_slot_stride, rows[u] != 0u);
    }
    // The next step's keys: block table and pos / tag loads in flight with this step's K/V.
    meta = resolve(step + 1);

    float s[S::kUnroll][ROWS];
#pragma unroll
    for (int u = 0; u < S::kUnroll; ++u) {
      float kf[kVec];
      unpack16<T>(k_raw[u], kf);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot = fmaf(q[r][e], kf[e], dot);
        s[u][r] = group_sum<S::kLanesPerKey>(dot);
      }
    }

    float vf[S::kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < S::kUnroll; ++u) unpack16<T>(v_raw[u], vf[u]);

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float block_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < S::kUnroll; ++u) {
        s[u][r] = (rows[u] >> r) & 1u ? s[u][r] : -INFINITY;
        block_max = fmaxf(block_max, s[u][r]);
      }
      const float m_new = fmaxf(m[r], block_max);
      if (m_new == -INFINITY) continue;  // nothing visible to this row yet
      const float alpha = exp2f(m[r] - m_new);  // 0 while m[r] is -inf
      float pu[S::kUnroll];
      float psum = 0.f;
#pragma unroll
      for (int u = 0; u < S::kUnroll; ++u) {
        pu[u] = exp2f(s[u][r] - m_new);  // exactly 0 for invisible keys
        psum += pu[u];
      }
      l[r] = l[r] * alpha + psum;
      m[r] = m_new;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        float a = acc[r][e] * alpha;
#pragma unroll
        for (int u = 0; u < S::kUnroll; ++u) a = fmaf(pu[u], vf[u][e], a);
        acc[r][e] = a;
      }
    }
  }

  // Merge the lane groups: with M = max_g m_g, group g's share is scaled by exp2(m_g - M).
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (sub == 0) {
      sm_m[key_group][r] = m[r];
      sm_l[key_group][r] = l[r];
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) sm_acc[key_group][r][sub * kVec + e] = acc[r][e];
  }
  __syncthreads();
  if (threadIdx.x < ROWS) {
    const int r = threadIdx.x;
    float big = -INFINITY;
    for (int g = 0; g < S::kKeyGroups; ++g) big = fmaxf(big, sm_m[g][r]);
    float total = 0.f;
    for (int g = 0; g < S::kKeyGroups; ++g) {
      const float f = big == -INFINITY ? 0.f : exp2f(sm_m[g][r] - big);
      sm_factor[g][r] = f;
      total += sm_l[g][r] * f;
    }
    sm_total_l[r] = total;
    sm_m[0][r] = big;  // group 0's slot now holds the block's max (read below)
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < ROWS * D; idx += kDecodeThreads) {
    const int r = idx / D, d = idx % D;
    const QueryRow qr = query_row(first_token, rows_in_seq, row0 + r, p.group, kv_head);
    if (!qr.valid) continue;
    float a = 0.f;
    for (int g = 0; g < S::kKeyGroups; ++g) a = fmaf(sm_acc[g][r][d], sm_factor[g][r], a);
    const int64_t out_row = qr.token * p.heads + qr.head;  // [total_q, heads] row of the output
    if (p.num_splits == 1) {
      const float total = sm_total_l[r];
      p.out[out_row * D + d] = from_float<T>(total > 0.f ? a / total : 0.f);  // no visible key: zeros
    } else {
      const int64_t part_row = split * p.total_q * p.heads + out_row;
      p.part_acc[part_row * D + d] = a;
      if (d == 0) {
        p.part_m[part_row] = sm_m[0][r];
        p.part_l[part_row] = sm_total_l[r];
      }
    }
  }
}

// Merges the splits of every (query token, head): one warp per output row.
// grid: ceil(total_q * heads / kCombineWarps) blocks of kCombineWarps warps.
constexpr int kCombineWarps = 4;

template <typename T, int D>
__global__ void __launch_bounds__(kCombineWarps * 32) decode_combine_kernel(const DecodeParams<T> p) {
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

}  // namespace skiplayers::cuda
