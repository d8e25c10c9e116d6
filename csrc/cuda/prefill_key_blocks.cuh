// The key blocks a query tile visits, classified before they are loaded: skipped (no query of the
// tile can see any of its keys), partial (the predicate runs per element) or full (every pair is
// visible: no predicate). Used by the next-generation prefill (prefill_fa2_kernel.cuh) so that the
// K/V copies of the *next* visible block can be issued before the current one is computed.
//
// The whole CTA classifies a window of kWindow = 256 key blocks at once into two bit masks in
// shared memory (bit j: block window_begin + j): warps take blocks round-robin, kUnroll of them at a
// time with all their position (and tag) loads issued before the first reduction, so a window costs
// a few global-load latencies whatever its length. Finding the next visible block is then a scan of
// 8 shared words (uniform across the CTA: every thread reads the same words). Key positions may be
// in any order (compaction, shuffled tests), so a tile cannot bound its loop without reading them;
// it reads 4 bytes (8 with tags) per key of the sequence and loads K/V only for visible blocks.
//
// Rule classes: kRuleCausal (rule == 0) reduces only min / max position and tests k_pos > q_pos;
// kRuleGeneral (context / anchors) reduces the full BlockSummary (visibility.h) with `rule`, plus
// whether the block holds a context key, and marks blocks full by block_fully_visible_general (no
// context key under hide-context; one common sentence under anchors).
#pragma once

#include "key_block_bits.h"
#include "prefill_common.cuh"

namespace skiplayers::cuda {

constexpr int kRuleCausal = 0;   // rule == 0: causal by position only
constexpr int kRuleGeneral = 1;  // any other rule (hide context, anchors)

// BlockSummary of 32 lanes' positions only (min / max position; other fields empty).
__device__ __forceinline__ BlockSummary warp_pos_summary(int32_t lo, int32_t hi) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    lo = min(lo, __shfl_xor_sync(kFullMask, lo, off));
    hi = max(hi, __shfl_xor_sync(kFullMask, hi, off));
  }
  BlockSummary s = block_summary_empty();
  s.min_pos = lo;
  s.max_pos = hi;
  return s;
}

template <int kRuleClass, int kKeys, int kWarps>
struct KeyBlockCursor {
  static constexpr int kWords = 8;
  static constexpr int kWindow = 32 * kWords;  // key blocks classified per refill
  static constexpr int kUnroll = 4;            // blocks per warp in flight during a refill
  static constexpr int kPerLane = kKeys / 32;  // keys of a block per lane
  static_assert(kKeys % 32 == 0, "key blocks are whole warps of keys");

  uint32_t* visible;   // shared [kWords]: block may be visible
  uint32_t* full;      // shared [kWords]: block fully visible (and not short)
  const int32_t* pos;  // the sequence's key positions [keys]
  const int32_t* tag;  // its key tags [keys] or nullptr (all 0)
  int64_t keys;
  int64_t blocks;        // ceil(keys / kKeys)
  int64_t window_begin;  // first block of the classified window
  int64_t rule;          // 0 for kRuleCausal
  const BlockSummary* q;  // the query tile's summary (shared memory: read only while refilling)

  __device__ __forceinline__ KeyBlockCursor(uint32_t* visible_, uint32_t* full_, const int32_t* pos_,
                                            const int32_t* tag_, int64_t keys_, int64_t rule_,
                                            const BlockSummary* q_)
      : visible(visible_), full(full_), pos(pos_), tag(tag_), keys(keys_),
        blocks((keys_ + kKeys - 1) / kKeys), window_begin(-kWindow), rule(kRuleClass == kRuleCausal ? 0 : rule_),
        q(q_) {}

  // Classifies blocks [begin, begin + kWindow). Barriers inside: called by every thread at once.
  __device__ void refill(int64_t begin) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    __syncthreads();  // every thread is done reading the previous window
    if (tid < kWords) visible[tid] = full[tid] = 0u;
    __syncthreads();
    window_begin = begin;
    const int count = static_cast<int>(blocks - begin < kWindow ? blocks - begin : kWindow);
    const BlockSummary qs = *q;
    for (int j0 = warp; j0 < count; j0 += kWarps * kUnroll) {
      int32_t kp[kUnroll][kPerLane], kt[kUnroll][kPerLane];
      bool in[kUnroll][kPerLane];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // all loads first
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t key = (begin + j0 + u * kWarps) * kKeys + i * 32 + lane;
          in[u][i] = j0 + u * kWarps < count && key < keys;
          kp[u][i] = in[u][i] ? pos[key] : 0;
          kt[u][i] = (kRuleClass != kRuleCausal && in[u][i] && tag) ? tag[key] : 0;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * kWarps;
        if (j >= count) break;  // uniform across the warp
        BlockSummary ks;
        bool any_context = false;
        if constexpr (kRuleClass == kRuleCausal) {
          int32_t lo = 0x7fffffff, hi = -0x7fffffff - 1;
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) {
            lo = in[u][i] ? min(lo, kp[u][i]) : lo;
            hi = in[u][i] ? max(hi, kp[u][i]) : hi;
          }
          ks = warp_pos_summary(lo, hi);
        } else {
          ks = block_summary_empty();
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) {
            if (in[u][i]) block_summary_add(ks, kp[u][i], kt[u][i]);
            any_context = any_context || (in[u][i] && tag_is_context(kt[u][i]));
          }
          ks = warp_summary(ks);
          any_context = __any_sync(kFullMask, any_context);
        }
        const int64_t first_key = (begin + j) * kKeys;
        const bool short_block = keys - first_key < kKeys;
        if (lane == 0 && block_may_be_visible(rule, qs, ks)) {
          atomicOr(&visible[j / 32], 1u << (j % 32));
          if (!short_block && block_fully_visible_general(rule, qs, ks, any_context)) atomicOr(&full[j / 32], 1u << (j % 32));
        }
      }
    }
    __syncthreads();
  }

  // The first block >= `from` that may be visible (`*is_full`: fully visible), or `blocks` when
  // none is left. Uniform across the CTA; call it from every thread at once (it may refill).
  __device__ __forceinline__ int64_t next(int64_t from, bool* is_full) {
    while (from < blocks) {
      if (from >= window_begin + kWindow) refill(from);
      const int j = first_set_bit_from(visible, kWords, static_cast<int>(from - window_begin));
      if (j >= 0) {
        *is_full = ((full[j / 32] >> (j % 32)) & 1u) != 0u;
        return window_begin + j;
      }
      from = window_begin + kWindow;
    }
    *is_full = false;
    return blocks;
  }
};

}  // namespace skiplayers::cuda
