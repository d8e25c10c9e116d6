// Host checks of the torch-free index math in csrc/include/skiplayers/ that the GPU kernels rely
// on and the CPU kernels do not all exercise (tile counting, effective split count, summary merge),
// plus the conservativeness of block skipping. Built and run by tests/test_index_math.py.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "expect.h"
#include "skiplayers/ragged.h"

using namespace skiplayers;

static void tiles() {
  std::mt19937 rng(1);
  for (int trial = 0; trial < 2000; ++trial) {
    const int batch = 1 + rng() % 80, group = 1 + rng() % 16, tile = (rng() % 2) ? 64 : 4 + rng() % 8;
    int64_t total = 0, actual = 0;
    for (int b = 0; b < batch; ++b) {
      const int n = (rng() % 3 == 0) ? 0 : rng() % 300;
      total += n;
      actual += tiles_of_sequence(n, group, tile);
      EXPECT(tiles_of_sequence(n, group, tile) * tile >= int64_t{n} * group);
      EXPECT(tiles_of_sequence(n, group, tile) * tile < int64_t{n} * group + tile);
    }
    const int64_t bound = tiles_upper_bound(total, batch, group, tile);
    EXPECT(bound >= actual);
    EXPECT(bound < actual + batch + 1);
  }
}

static void splits() {
  for (int64_t length = 0; length < 700; length += 7)
    for (int64_t num_splits = 1; num_splits < 40; num_splits += 3)
      for (int64_t min_keys : {int64_t{1}, int64_t{128}}) {
        const int64_t s = effective_splits(length, num_splits, min_keys);
        EXPECT(s >= 1 && s <= num_splits);
        if (min_keys == 1 && length >= num_splits) EXPECT(s == num_splits);
        int64_t expect_begin = 0;
        for (int64_t i = 0; i < s; ++i) {
          int64_t begin, end;
          split_key_range(length, s, i, 64, &begin, &end);
          EXPECT(begin == expect_begin || begin == end);  // consecutive pieces, empty ones at the end
          EXPECT(begin <= end && end <= length);
          EXPECT(begin == length || begin % 64 == 0);
          if (end > begin) expect_begin = end;
        }
        EXPECT(expect_begin == length);
      }
}

struct Token {
  int32_t pos, tag;
};

static Token random_token(std::mt19937& rng) {
  const int32_t sentence = rng() % 6;
  int32_t tag = sentence << kTagSentenceShift;
  if (rng() % 3 == 0) tag |= kTagContext;
  if (rng() % 4 == 0) tag |= kTagAnchor;
  if (rng() % 9 == 0) tag |= kTagSink;
  return Token{static_cast<int32_t>(rng() % 50), tag};
}

static void summaries() {
  std::mt19937 rng(2);
  for (int trial = 0; trial < 20000; ++trial) {
    std::vector<Token> q(1 + rng() % 6), k(1 + rng() % 6);
    for (auto& t : q) t = random_token(rng);
    for (auto& t : k) t = random_token(rng);
    BlockSummary qs = block_summary_empty(), ks = block_summary_empty(), k_lo = block_summary_empty(),
                 k_hi = block_summary_empty();
    for (const auto& t : q) block_summary_add(qs, t.pos, t.tag);
    for (size_t j = 0; j < k.size(); ++j) {
      block_summary_add(ks, k[j].pos, k[j].tag);
      block_summary_add(j % 2 ? k_hi : k_lo, k[j].pos, k[j].tag);
    }
    const BlockSummary merged = block_summary_merge(k_lo, k_hi);
    EXPECT(merged.min_pos == ks.min_pos && merged.max_pos == ks.max_pos);
    EXPECT(merged.min_sentence == ks.min_sentence && merged.max_sentence == ks.max_sentence);
    EXPECT(merged.min_anchor_sentence == ks.min_anchor_sentence);
    EXPECT(merged.any_sink == ks.any_sink && merged.any_non_context == ks.any_non_context);
    for (int64_t rule = 0; rule <= kRuleAllBits; ++rule) {
      bool any = false, all = true;
      for (const auto& a : q)
        for (const auto& b : k) {
          const bool v = key_visible(rule, a.pos, a.tag, b.pos, b.tag);
          any = any || v;
          all = all && v;
        }
      if (any) EXPECT(block_may_be_visible(rule, qs, ks));  // skipping never drops a visible pair
      if (block_fully_visible(rule, qs, ks)) EXPECT(all);   // the mask is only skipped when exact
    }
  }
  const BlockSummary empty = block_summary_empty();
  BlockSummary one = block_summary_empty();
  block_summary_add(one, 3, 0);
  EXPECT(!block_may_be_visible(0, one, empty));  // an empty key block is always skipped
}

static void merging() {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> score(-20.f, 20.f);
  for (int trial = 0; trial < 1000; ++trial) {
    std::vector<float> s(1 + rng() % 50);
    for (auto& x : s) x = (rng() % 7 == 0) ? -INFINITY : score(rng);
    const size_t cut = rng() % (s.size() + 1);
    auto stats = [&](size_t lo, size_t hi, float* m, float* l) {
      *m = -INFINITY;
      for (size_t i = lo; i < hi; ++i) *m = std::fmax(*m, s[i]);
      *l = 0.f;
      if (*m == -INFINITY) return;
      for (size_t i = lo; i < hi; ++i) *l += std::exp2(s[i] - *m);
    };
    float ma, la, mb, lb, m, l, mm, ll;
    stats(0, cut, &ma, &la);
    stats(cut, s.size(), &mb, &lb);
    stats(0, s.size(), &m, &l);
    const MergeFactors f = merge_softmax_stats(ma, la, mb, lb, &mm, &ll);
    EXPECT(mm == m);
    EXPECT(std::fabs(ll - l) <= 1e-5f * std::fmax(1.f, l));
    EXPECT(std::isfinite(f.a) && std::isfinite(f.b));
  }
}

int main() {
  tiles();
  splits();
  summaries();
  merging();
  if (expect_failures) return 1;
  std::printf("index math: all checks passed\n");
  return 0;
}
