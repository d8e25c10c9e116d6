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
//          kLanesPerKey lanes share one key: each loads kVecsPerLane 128-bit vectors of the key (and
//          value) row, so a key row is one coalesced access; the block's kKeyGroups lane groups take
//          keys round-robin, kUnroll keys in flight per group. A row of kVectors vectors takes the
//          next power of two of lanes (at most 32); lanes past the row's vectors hold zeros (fp32
//          at D = 96: 24 of 32 lanes; D = 256: 32 lanes of 2 vectors).
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
// Used by both generations: the stable one for every dtype at D = 64 / 128, the next one for fp32
// (tensor cores would lose precision) at D = 64 / 96 / 128 / 256.
#pragma once

#include "decode_common.cuh"

namespace skiplayers::cuda {

constexpr int kDecodeThreads = 128;

constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }

template <typename T, int D>
struct DecodeShape {
  static constexpr int kVec = kVec16<T>;               // elements of one 128-bit vector
  static constexpr int kVectors = D / kVec;            // vectors of a key row
  static constexpr int kLanesPerKey = kVectors < 32 ? pow2_at_least(kVectors) : 32;  // 8 / 16 (16-bit), 16 / 32 (fp32)
  static constexpr int kVecsPerLane = (kVectors + kLanesPerKey - 1) / kLanesPerKey;  // 1, or 2 (fp32 at D = 256)
  static constexpr int kPerLane = kVecsPerLane * kVec;  // elements of a row one lane holds
  static constexpr int kKeyGroups = kDecodeThreads / kLanesPerKey;
  static constexpr int kGroupsPerWarp = 32 / kLanesPerKey;
  static constexpr int kUnroll = 2;                    // keys in flight per lane group
  static constexpr int kStep = kKeyGroups * kUnroll;   // keys of the block per step
  static constexpr int kKeysPerWarp = kGroupsPerWarp * kUnroll;  // keys of one warp per step
  static_assert(kLanesPerKey <= 32 && 32 % kLanesPerKey == 0, "a key row must fit a warp");
  static_assert(kKeysPerWarp <= 32, "a warp resolves its keys of a step one lane per key");
  static_assert(D % kVec == 0, "a key row is whole 128-bit vectors");
  // Lane `sub` of a key's lanes holds vectors sub + i * kLanesPerKey, i < kVecsPerLane, those < kVectors.
  static __device__ __forceinline__ bool holds(int sub, int i) { return sub + i * kLanesPerKey < kVectors; }
};

// One key as the lane that resolved it hands it on: where it lies and which rows of the tile see it.
struct KeyMeta {
  int32_t slot;   // flat slot of the pools (valid only where rows != 0)
  uint32_t rows;  // bit r: row r sees the key; 0: the key is not loaded
};

// Key j of a step resolved by one lane: its page through the block table row (checked to be a page
// of the pool, decode_common.cuh), then its pos / tag and the rows of the tile that see it. Keys at
// or past key_end (outside the split, or past the sequence's length) are never touched: their block
// table entries may be unassigned (-1).
template <int ROWS>
__device__ __forceinline__ KeyMeta resolve_key(const int32_t* table_row, int32_t page_size, int32_t pool_slots,
                                               const int32_t* pos_cache, const int32_t* tag_cache, int64_t rule,
                                               int64_t j, int64_t key_end, bool resolver, const int32_t (&q_pos)[ROWS],
                                               const int32_t (&q_tag)[ROWS], const bool (&row_valid)[ROWS]) {
  KeyMeta m{0, 0u};
  if (resolver && j < key_end) {
    const int32_t slot = key_slot(key_page(table_row, page_size, j), page_size, pool_slots, j);
    const int32_t kp = pos_cache[slot];
    const int32_t kt = tag_cache ? tag_cache[slot] : 0;
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      if (row_valid[r] && key_visible(rule, q_pos[r], q_tag[r], kp, kt)) m.rows |= 1u << r;
    m.slot = slot;
  }
  return m;
}

// grid: (query tiles upper bound, kv_heads, num_splits)
template <typename T, int D, int ROWS>
__global__ void __launch_bounds__(kDecodeThreads) decode_split_kernel(const DecodeParams<T> p) {
  using S = DecodeShape<T, D>;
  constexpr int kVec = S::kVec;
  constexpr int kPer = S::kPerLane;
  static_assert(ROWS <= 32, "row visibility is a 32-bit mask");
  __shared__ float sm_acc[S::kKeyGroups][ROWS][D];
  __shared__ float sm_m[S::kKeyGroups][ROWS];
  __shared__ float sm_l[S::kKeyGroups][ROWS];
  __shared__ float sm_factor[S::kKeyGroups][ROWS];
  __shared__ float sm_total_l[ROWS];

  const TileCoord tc = locate_tile(p.cu_seqlens_q, p.batch, p.group, ROWS, blockIdx.x, p.total_q);
  if (tc.seq < 0) return;
  const int32_t kv_head = blockIdx.y;
  const int32_t split = blockIdx.z;
  DecodeWork work;
  if (!decode_work(p, tc, ROWS, split, &work)) return;
  const int64_t key_begin = work.key_begin, key_end = work.key_end;
  const int64_t first_token = work.first_token, rows_in_seq = work.rows_in_seq, row0 = work.row0;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x / 32;
  const int key_group = threadIdx.x / S::kLanesPerKey;
  const int sub = threadIdx.x % S::kLanesPerKey;  // which 128-bit vectors of the row this lane holds

  // Queries, pre-scaled by scale * log2(e) so the softmax runs in base 2. Element i * kVec + e of a
  // lane's row is element (sub + i * kLanesPerKey) * kVec + e of the row.
  float q[ROWS][kPer];
  int32_t q_pos[ROWS], q_tag[ROWS];
  bool row_valid[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const QueryRow qr = query_row(first_token, rows_in_seq, row0 + r, p.group, kv_head);
    row_valid[r] = qr.valid;
    q_pos[r] = p.q_pos[qr.token];
    q_tag[r] = p.q_tag ? p.q_tag[qr.token] : 0;
#pragma unroll
    for (int i = 0; i < S::kVecsPerLane; ++i) {
      float* qi = q[r] + i * kVec;
      if (qr.valid && S::holds(sub, i)) {
        const T* row = p.q + qr.token * p.q_token_stride + qr.head * p.q_head_stride;
        unpack16<T>(load16(row + (sub + i * S::kLanesPerKey) * kVec), *reinterpret_cast<float(*)[kVec]>(qi));
#pragma unroll
        for (int e = 0; e < kVec; ++e) qi[e] *= p.scale_log2;
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) qi[e] = 0.f;
      }
    }
  }

  float m[ROWS], l[ROWS], acc[ROWS][kPer];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < kPer; ++e) acc[r][e] = 0.f;
  }

  const T* k_base = p.k_cache + kv_head * p.k_head_stride + sub * kVec;
  const T* v_base = p.v_cache + kv_head * p.v_head_stride + sub * kVec;
  const int32_t* table_row = work.table_row;

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
    uint4 k_raw[S::kUnroll][S::kVecsPerLane], v_raw[S::kUnroll][S::kVecsPerLane];
#pragma unroll
    for (int u = 0; u < S::kUnroll; ++u) {
#pragma unroll
      for (int i = 0; i < S::kVecsPerLane; ++i) {
        const bool load = rows[u] != 0u && S::holds(sub, i);
        const int64_t offset = i * S::kLanesPerKey * kVec;
        k_raw[u][i] = load16_if(k_base + static_cast<int64_t>(slot[u]) * p.k_slot_stride + offset, load);
        v_raw[u][i] = load16_if(v_base + static_cast<int64_t>(slot[u]) * p.v_slot_stride + offset, load);
      }
    }
    // The next step's keys: block table and pos / tag loads in flight with this step's K/V.
    meta = resolve(step + 1);

    float s[S::kUnroll][ROWS];
#pragma unroll
    for (int u = 0; u < S::kUnroll; ++u) {
      float kf[kPer];
#pragma unroll
      for (int i = 0; i < S::kVecsPerLane; ++i)
        unpack16<T>(k_raw[u][i], *reinterpret_cast<float(*)[kVec]>(kf + i * kVec));
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kPer; ++e) dot = fmaf(q[r][e], kf[e], dot);
        s[u][r] = group_sum<S::kLanesPerKey>(dot);
      }
    }

    float vf[S::kUnroll][kPer];
#pragma unroll
    for (int u = 0; u < S::kUnroll; ++u)
#pragma unroll
      for (int i = 0; i < S::kVecsPerLane; ++i)
        unpack16<T>(v_raw[u][i], *reinterpret_cast<float(*)[kVec]>(vf[u] + i * kVec));

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
      for (int e = 0; e < kPer; ++e) {
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
    for (int i = 0; i < S::kVecsPerLane; ++i)
      if (S::holds(sub, i))
#pragma unroll
        for (int e = 0; e < kVec; ++e) sm_acc[key_group][r][(sub + i * S::kLanesPerKey) * kVec + e] = acc[r][i * kVec + e];
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

}  // namespace skiplayers::cuda
