// Host checks of the block classification the next-generation prefill kernels rely on
// (csrc/include/skiplayers/visibility.h): block_fully_visible_general may only claim a (query block,
// key block) pair fully visible when key_visible holds for every pair, and must agree with
// block_fully_visible under the plain causal rule. Exhaustive over all blocks of one or two tokens
// drawn from a small alphabet (positions 0..2, sentences 0..1, every combination of the CONTEXT,
// ANCHOR and SINK bits), for every rule; then random larger blocks. Built and run by
// tests/test_index_math.py. Also the key-block bit scan of csrc/cuda/key_block_bits.h.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../../csrc/cuda/key_block_bits.h"
#include "expect.h"
#include "skiplayers/visibility.h"

using namespace skiplayers;

struct Token {
  int32_t pos, tag;
};

static BlockSummary summary(const std::vector<Token>& b) {
  BlockSummary s = block_summary_empty();
  for (const Token& t : b) block_summary_add(s, t.pos, t.tag);
  return s;
}

static bool any_context(const std::vector<Token>& b) {
  for (const Token& t : b)
    if (tag_is_context(t.tag)) return true;
  return false;
}

// Checks one (queries, keys) pair of blocks under every rule; counts the claims made.
static void check(const std::vector<Token>& q, const std::vector<Token>& k, long* claims) {
  const BlockSummary qs = summary(q), ks = summary(k);
  const bool k_ctx = any_context(k);
  for (int64_t rule = 0; rule <= kRuleAllBits; ++rule) {
    bool all = true;
    for (const Token& a : q)
      for (const Token& b : k) all = all && key_visible(rule, a.pos, a.tag, b.pos, b.tag);
    const bool claim = block_fully_visible_general(rule, qs, ks, k_ctx);
    if (claim) {
      EXPECT(all);  // the per-element mask is only dropped when it is all true
      ++*claims;
    }
    if (block_fully_visible(rule, qs, ks)) EXPECT(claim);  // never weaker than the plain test
    if (rule == 0) EXPECT(claim == block_fully_visible(rule, qs, ks));
  }
}

static std::vector<Token> alphabet() {
  std::vector<Token> out;
  for (int32_t pos = 0; pos < 3; ++pos)
    for (int32_t sentence = 0; sentence < 2; ++sentence)
      for (int32_t bits = 0; bits < 8; ++bits)  // CONTEXT | ANCHOR | SINK
        out.push_back(Token{pos, (sentence << kTagSentenceShift) | bits});
  return out;
}

static void exhaustive() {
  const std::vector<Token> a = alphabet();
  std::vector<std::vector<Token>> blocks;
  for (size_t i = 0; i < a.size(); ++i) {
    blocks.push_back({a[i]});
    for (size_t j = i; j < a.size(); ++j) blocks.push_back({a[i], a[j]});
  }
  long claims = 0;
  for (const auto& q : blocks)
    for (const auto& k : blocks) check(q, k, &claims);
  EXPECT(claims > 0);
  std::printf("visibility: %zu x %zu blocks, %ld fully-visible claims checked\n", blocks.size(), blocks.size(),
              claims);
}

static void random_blocks() {
  std::mt19937 rng(7);
  long claims = 0;
  for (int trial = 0; trial < 200000; ++trial) {
    std::vector<Token> q(1 + rng() % 8), k(1 + rng() % 8);
    const int32_t sentences = 1 + rng() % 3, span = 1 + rng() % 40;
    for (auto* block : {&q, &k})
      for (auto& t : *block) {
        int32_t tag = static_cast<int32_t>(rng() % sentences) << kTagSentenceShift;
        if (rng() % 4 == 0) tag |= kTagContext;
        if (rng() % 4 == 0) tag |= kTagAnchor;
        if (rng() % 8 == 0) tag |= kTagSink;
        t = Token{static_cast<int32_t>(rng() % span), tag};
      }
    check(q, k, &claims);
  }
  EXPECT(claims > 0);
}

// first_set_bit_from (the key-block scan of the next-generation prefill) against a naive scan.
static void bit_scan() {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 20000; ++trial) {
    const int n_words = 1 + rng() % 8;
    std::vector<uint32_t> w(n_words);
    for (auto& x : w) {
      const int kind = rng() % 4;  // empty, one bit, sparse, dense
      x = kind == 0 ? 0u : kind == 1 ? 1u << (rng() % 32) : kind == 2 ? (rng() & rng() & rng()) : rng();
    }
    for (int from = 0; from < 32 * n_words; ++from) {
      int expect = -1;
      for (int i = from; i < 32 * n_words && expect < 0; ++i)
        if ((w[i / 32] >> (i % 32)) & 1u) expect = i;
      EXPECT(first_set_bit_from(w.data(), n_words, from) == expect);
    }
  }
}

int main() {
  exhaustive();
  random_blocks();
  bit_scan();
  if (expect_failures) return 1;
  std::printf("visibility: all checks passed\n");
  return 0;
}
