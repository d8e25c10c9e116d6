// Key ranges for prefill under the AnSAN rule (CPU launcher).
//
// A query of sentence s sees the anchors (and sinks) of earlier sentences and the tokens of its own
// sentence. When a sequence's keys are in position order with non-decreasing sentence ids (packed
// prompts always are), a query tile whose first query is in sentence s0 needs only
//   (a) the anchor/sink keys before the first key of sentence s0, gathered once per call, and
//   (b) the contiguous keys from the first key of sentence s0 on.
// Both runs go through the same engine and the same predicate, so the result is the one the full
// key range gives; only the keys the rule hides are never read. Cost per query: anchors + sentence,
// not the sequence length. Sequences whose keys are not ordered that way keep the full range.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/tensor.h>

#include <algorithm>
#include <vector>

#include "skiplayers/visibility.h"

namespace skiplayers::cpu {

struct AnchorPlan {
  bool enabled = false;
  std::vector<uint8_t> ordered;       // per sequence: keys ordered by position and sentence
  std::vector<int64_t> gather_begin;  // per sequence: first gathered row (size B + 1)
  std::vector<int64_t> gathered_key;  // per gathered row: its key index within its sequence
  at::Tensor k, v, pos, tag;          // gathered anchor/sink keys, all sequences packed

  // (a): gathered rows [*begin, *end) of sequence b that precede key `window_start`.
  void anchors_before(int64_t b, int64_t window_start, int64_t* begin, int64_t* end) const {
    const auto first = gathered_key.begin() + gather_begin[b];
    const auto last = gathered_key.begin() + gather_begin[b + 1];
    *begin = gather_begin[b];
    *end = gather_begin[b] + (std::lower_bound(first, last, window_start) - first);
  }
};

// (b): index of the first key (within [0, n)) whose sentence is >= `sentence`.
inline int64_t first_key_of_sentence(const int32_t* k_tag, int64_t n, int32_t sentence) {
  const int32_t* it = std::lower_bound(k_tag, k_tag + n, sentence,
                                       [](int32_t tag, int32_t s) { return tag_sentence(tag) < s; });
  return it - k_tag;
}

inline AnchorPlan make_anchor_plan(int64_t rule, const at::Tensor& k, const at::Tensor& v, const int32_t* cu_k,
                                   int64_t batch, const int32_t* k_pos, const int32_t* k_tag) {
  AnchorPlan plan;
  if (!(rule & kRuleAnchors) || k_tag == nullptr) return plan;
  plan.enabled = true;
  plan.ordered.assign(batch, 1);
  plan.gather_begin.assign(batch + 1, 0);
  std::vector<int64_t> rows;  // packed key rows to gather
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = cu_k[b] + 1; j < cu_k[b + 1]; ++j)
      if (k_pos[j] <= k_pos[j - 1] || tag_sentence(k_tag[j]) < tag_sentence(k_tag[j - 1])) plan.ordered[b] = 0;
    for (int64_t j = cu_k[b]; j < cu_k[b + 1]; ++j)
      if (k_tag[j] & (kTagAnchor | kTagSink)) {
        rows.push_back(j);
        plan.gathered_key.push_back(j - cu_k[b]);
      }
    plan.gather_begin[b + 1] = static_cast<int64_t>(rows.size());
  }
  const at::Tensor index = at::tensor(rows, k.options().dtype(at::kLong));
  plan.k = at::index_select(k, 0, index).contiguous();
  plan.v = at::index_select(v, 0, index).contiguous();
  std::vector<int32_t> pos, tag;
  for (int64_t r : rows) {
    pos.push_back(k_pos[r]);
    tag.push_back(k_tag[r]);
  }
  plan.pos = at::tensor(pos, k.options().dtype(at::kInt));
  plan.tag = at::tensor(tag, k.options().dtype(at::kInt));
  return plan;
}

}  // namespace skiplayers::cpu
