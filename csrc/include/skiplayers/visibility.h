// The one visibility predicate of skiplayers: may query token i attend to key token j?
//
// Torch-free and header-only so that the C++ CPU kernels, the CUDA kernels and the CPU tests all
// evaluate the same logic. Python mirrors the constants in skiplayers/meta.py (a test checks they
// agree) and the Triton kernels re-state the predicate in triton_kernels/visibility.py.
//
// Every token carries two int32 words of metadata:
//   pos  its absolute position (the RoPE index). Causality compares positions, never row indices,
//        because compaction breaks "row index == position".
//   tag  bit 0  CONTEXT  the token is a context token (instructions, few-shot examples)
//        bit 1  ANCHOR   the token ends its sentence (AnLLM anchor)
//        bit 2  SINK     the token stays visible to every later token (attention sink)
//        bits 3..30      the sentence id: the number of anchors strictly before the token
//
// A `rule` word (int64 in the op schemas) switches the optional terms on:
//   RULE_HIDE_CONTEXT  keys tagged CONTEXT are invisible. This is the *masked* form of context
//                      stop; the fast path instead never stores those keys at all.
//   RULE_ANCHORS       the AnSAN rule of AnLLM (Pang et al. 2024): a non-anchor query of sentence s
//                      sees the anchors of sentences < s and the tokens of s; an anchor query sees
//                      only its own sentence. SINK keys are visible regardless.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SKIPLAYERS_HD __host__ __device__ __forceinline__
#else
#define SKIPLAYERS_HD inline
#endif

namespace skiplayers {

constexpr int32_t kTagContext = 1;
constexpr int32_t kTagAnchor = 2;
constexpr int32_t kTagSink = 4;
constexpr int kTagSentenceShift = 3;

constexpr int64_t kRuleHideContext = 1;
constexpr int64_t kRuleAnchors = 2;
constexpr int64_t kRuleAllBits = kRuleHideContext | kRuleAnchors;

SKIPLAYERS_HD int32_t tag_sentence(int32_t tag) { return tag >> kTagSentenceShift; }
SKIPLAYERS_HD bool tag_is_context(int32_t tag) { return (tag & kTagContext) != 0; }
SKIPLAYERS_HD bool tag_is_anchor(int32_t tag) { return (tag & kTagAnchor) != 0; }
SKIPLAYERS_HD bool tag_is_sink(int32_t tag) { return (tag & kTagSink) != 0; }

// The predicate itself. `rule` holds kRule* bits; absent tags are passed as 0.
SKIPLAYERS_HD bool key_visible(int64_t rule, int32_t q_pos, int32_t q_tag, int32_t k_pos, int32_t k_tag) {
  if (k_pos > q_pos) return false;
  if ((rule & kRuleHideContext) && tag_is_context(k_tag)) return false;
  if (rule & kRuleAnchors) {
    if (tag_is_sink(k_tag)) return true;
    const int32_t qs = tag_sentence(q_tag);
    const int32_t ks = tag_sentence(k_tag);
    if (ks == qs) return true;
    return !tag_is_anchor(q_tag) && tag_is_anchor(k_tag) && ks < qs;
  }
  return true;
}

// Conservative summary of a block of tokens, so kernels can skip whole key blocks that no query
// of a query block can see (not loaded, not computed). `block_may_be_visible` may answer true for
// a block that turns out invisible, never false for a block with a visible pair.
struct BlockSummary {
  int32_t min_pos;
  int32_t max_pos;
  int32_t min_sentence;
  int32_t max_sentence;
  int32_t min_anchor_sentence;  // smallest sentence id among ANCHOR tokens (INT32_MAX if none)
  bool any_sink;
  bool any_non_context;
};

SKIPLAYERS_HD BlockSummary block_summary_empty() {
  BlockSummary s;
  s.min_pos = 0x7fffffff;
  s.max_pos = -0x7fffffff - 1;
  s.min_sentence = 0x7fffffff;
  s.max_sentence = -0x7fffffff - 1;
  s.min_anchor_sentence = 0x7fffffff;
  s.any_sink = false;
  s.any_non_context = false;
  return s;
}

SKIPLAYERS_HD void block_summary_add(BlockSummary& s, int32_t pos, int32_t tag) {
  const int32_t sent = tag_sentence(tag);
  s.min_pos = pos < s.min_pos ? pos : s.min_pos;
  s.max_pos = pos > s.max_pos ? pos : s.max_pos;
  s.min_sentence = sent < s.min_sentence ? sent : s.min_sentence;
  s.max_sentence = sent > s.max_sentence ? sent : s.max_sentence;
  if (tag_is_anchor(tag)) {
    s.min_anchor_sentence = sent < s.min_anchor_sentence ? sent : s.min_anchor_sentence;
  }
  s.any_sink = s.any_sink || tag_is_sink(tag);
  s.any_non_context = s.any_non_context || !tag_is_context(tag);
}

// The summary of the union of two blocks (kernels reduce per-thread summaries with it).
SKIPLAYERS_HD BlockSummary block_summary_merge(const BlockSummary& a, const BlockSummary& b) {
  BlockSummary s;
  s.min_pos = a.min_pos < b.min_pos ? a.min_pos : b.min_pos;
  s.max_pos = a.max_pos > b.max_pos ? a.max_pos : b.max_pos;
  s.min_sentence = a.min_sentence < b.min_sentence ? a.min_sentence : b.min_sentence;
  s.max_sentence = a.max_sentence > b.max_sentence ? a.max_sentence : b.max_sentence;
  s.min_anchor_sentence = a.min_anchor_sentence < b.min_anchor_sentence ? a.min_anchor_sentence : b.min_anchor_sentence;
  s.any_sink = a.any_sink || b.any_sink;
  s.any_non_context = a.any_non_context || b.any_non_context;
  return s;
}

// May some query of block q see some key of block k?
SKIPLAYERS_HD bool block_may_be_visible(int64_t rule, const BlockSummary& q, const BlockSummary& k) {
  if (k.min_pos > q.max_pos) return false;
  if ((rule & kRuleHideContext) && !k.any_non_context) return false;
  if (rule & kRuleAnchors) {
    if (k.any_sink) return true;
    const bool sentences_overlap = k.min_sentence <= q.max_sentence && q.min_sentence <= k.max_sentence;
    const bool earlier_anchor = k.min_anchor_sentence < q.max_sentence;
    return sentences_overlap || earlier_anchor;
  }
  return true;
}

// Is every (query, key) pair of the two blocks visible? Then kernels skip the per-element mask.
// Only claimed for the plain causal rule (anchors and hidden context always evaluate per element).
SKIPLAYERS_HD bool block_fully_visible(int64_t rule, const BlockSummary& q, const BlockSummary& k) {
  return rule == 0 && k.max_pos <= q.min_pos;
}

// A sharper form of block_fully_visible for any rule, given whether the key block holds a CONTEXT
// key (`k_any_context`; BlockSummary does not record it). Every pair is visible when the block is
// entirely in the queries' past and
//   RULE_HIDE_CONTEXT  no key of the block is a context key, and
//   RULE_ANCHORS       all queries and all keys lie in one and the same sentence (ks == qs: visible
//                      whatever the anchor and sink bits).
// Equal to block_fully_visible for rule 0. Host-tested exhaustively on small blocks against
// key_visible (tests/cpp/visibility_test.cpp).
SKIPLAYERS_HD bool block_fully_visible_general(int64_t rule, const BlockSummary& q, const BlockSummary& k,
                                               bool k_any_context) {
  if (k.max_pos > q.min_pos) return false;
  if ((rule & kRuleHideContext) && k_any_context) return false;
  if (rule & kRuleAnchors) {
    return q.min_sentence == q.max_sentence && k.min_sentence == k.max_sentence && q.min_sentence == k.min_sentence;
  }
  return true;
}

}  // namespace skiplayers
