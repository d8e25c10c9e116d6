// The CPU attention engine shared by both attention ops: one query tile (a few tokens x the query
// heads that share one KV head) against a range of key rows of one sequence, flash-attention
// style: key blocks the predicate rules out are skipped, scores of visible blocks come from a
// GEMM, the softmax is online (base 2), and the output accumulates in float32.
//
// Packed keys (varlen_attention) and paged cache slots (cache_attention) are both "a run of key
// rows" (strided, or strided within pages named by a block table row), so one engine serves both;
// the launchers only enumerate tiles and splits.
#pragma once

#include <cmath>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "skiplayers/ragged.h"
#include "softmax_rows.h"

namespace skiplayers::cpu {

constexpr int64_t kKeyBlock = 128;
constexpr float kLog2e = 1.4426950408889634f;

// Query tile: `count` tokens, `group` consecutive heads starting at `q` (token 0, head 0 of the group).
template <typename scalar_t>
struct QueryTile {
  const scalar_t* q;
  int64_t token_stride;
  int64_t head_stride;
  const int32_t* pos;
  const int32_t* tag;  // nullptr: all tags 0
  int64_t count;
  int64_t group;
};

// Key rows [begin, end) of one sequence and one KV head. Row j is flat row j of k, v, pos and tag,
// or, when `pages` is set (a paged cache), flat row paged_slot(pages, page_size, j) of the pools.
template <typename scalar_t>
struct KeyRun {
  const scalar_t* k;
  const scalar_t* v;
  int64_t k_stride;  // between flat rows (a page's consecutive slots; pages are page_size rows apart)
  int64_t v_stride;
  const int32_t* pos;
  const int32_t* tag;  // nullptr: all tags 0
  int64_t begin;
  int64_t end;
  const int32_t* pages = nullptr;  // the sequence's block table row, or nullptr: rows are not paged
  int64_t page_size = 0;

  int64_t flat(int64_t j) const { return pages ? paged_slot(pages, page_size, j) : j; }
};

// Unnormalised result of a tile: rows r = g * count + i (head-major), acc [rows, head_dim],
// running max m and sum l of the base-2 softmax. Valid input: m = -inf, l = 0, acc = 0.
struct PartialResult {
  float* acc;
  float* m;
  float* l;
};

// Scratch buffers, one set per worker thread, grown on demand.
struct Scratch {
  std::vector<float> q;       // [rows, D]
  std::vector<float> scores;  // [rows, kKeyBlock]
  std::vector<float> k;       // [kKeyBlock, D], the key block as dense float rows
  std::vector<float> k_t;     // [D, kKeyBlock], GEMM scratch (see gemm.h)
  std::vector<float> v;       // [kKeyBlock, D], the value block as dense float rows
  std::vector<uint8_t> visible;  // [count, kKeyBlock]
  std::vector<int64_t> rows;     // [kKeyBlock], flat rows of a paged key block
  std::vector<int32_t> pos, tag;  // [kKeyBlock], a paged key block's metadata, gathered

  void reserve(int64_t rows_, int64_t count, int64_t head_dim) {
    q.resize(rows_ * head_dim);
    scores.resize(rows_ * kKeyBlock);
    k.resize(kKeyBlock * head_dim);
    k_t.resize(head_dim * kKeyBlock);
    v.resize(kKeyBlock * head_dim);
    visible.resize(count * kKeyBlock);
    rows.resize(kKeyBlock);
    pos.resize(kKeyBlock);
    tag.resize(kKeyBlock);
  }
};

inline void init_partial(PartialResult p, int64_t rows, int64_t head_dim) {
  for (int64_t r = 0; r < rows; ++r) {
    p.m[r] = -INFINITY;
    p.l[r] = 0.f;
  }
  std::fill(p.acc, p.acc + rows * head_dim, 0.f);
}

// One key block [kb, kb + n) of a KeyRun: its metadata, and where its flat rows are.
struct KeyBlock {
  const int64_t* rows;  // flat rows, or nullptr: rows first .. first + n - 1
  const int32_t* pos;
  const int32_t* tag;  // nullptr: all tags 0
  int64_t first;       // flat row of key kb (rows == nullptr)
};

template <typename scalar_t>
KeyBlock key_block(const KeyRun<scalar_t>& kr, int64_t kb, int64_t n, Scratch& ws) {
  if (!kr.pages) return KeyBlock{nullptr, kr.pos + kb, kr.tag ? kr.tag + kb : nullptr, kb};
  int64_t* rows = ws.rows.data();
  for (int64_t j = 0; j < n; ++j) {
    rows[j] = kr.flat(kb + j);
    ws.pos[j] = kr.pos[rows[j]];
    ws.tag[j] = kr.tag ? kr.tag[rows[j]] : 0;
  }
  return KeyBlock{rows, ws.pos.data(), ws.tag.data(), 0};
}

// A key or value block as dense float rows [n, D] in `buffer`: copied (float) or converted (half,
// bfloat16) row by row from wherever its rows are (strided by the other KV heads, or in pages).
// Dense rows are what the GEMM reads fastest: measured on the decode op (one thread, 9/3 heads,
// D=64, float32), copying first made a step over 8,192 cached keys 1.5x faster than a GEMM on the
// strided rows in place, and left prefill within noise.
template <typename scalar_t>
const float* block_as_float(const scalar_t* base, int64_t stride, const KeyBlock& block, int64_t n, int64_t D,
                            float* buffer) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* row = base + (block.rows ? block.rows[j] : block.first + j) * stride;
    if constexpr (std::is_same_v<scalar_t, float>)
      std::memcpy(buffer + j * D, row, D * sizeof(float));
    else
      load_scaled(row, buffer + j * D, D, 1.f);
  }
  return buffer;
}

template <typename scalar_t>
void attend(const QueryTile<scalar_t>& qt, const KeyRun<scalar_t>& kr, int64_t head_dim, int64_t rule, float scale,
            PartialResult out, Scratch& ws) {
  const int64_t rows = qt.group * qt.count;
  const int64_t D = head_dim;
  ws.reserve(rows, qt.count, D);
  float* qbuf = ws.q.data();
  float* scores = ws.scores.data();

  // Queries scaled by scale * log2(e), so the softmax runs in base 2.
  BlockSummary qsum = block_summary_empty();
  for (int64_t i = 0; i < qt.count; ++i) {
    block_summary_add(qsum, qt.pos[i], qt.tag ? qt.tag[i] : 0);
    for (int64_t g = 0; g < qt.group; ++g) {
      load_scaled(qt.q + i * qt.token_stride + g * qt.head_stride, qbuf + (g * qt.count + i) * D, D,
                  scale * kLog2e);
    }
  }

  for (int64_t kb = kr.begin; kb < kr.end; kb += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, kr.end - kb);
    const KeyBlock block = key_block(kr, kb, n, ws);
    BlockSummary ksum = block_summary_empty();
    for (int64_t j = 0; j < n; ++j) block_summary_add(ksum, block.pos[j], block.tag ? block.tag[j] : 0);
    if (!block_may_be_visible(rule, qsum, ksum)) continue;  // skipped: never loaded, never computed

    // scores[rows, n] = qbuf[rows, D] . K_block^T
    const float* kblock = block_as_float(kr.k, kr.k_stride, block, n, D, ws.k.data());
    gemm_abt(rows, n, D, qbuf, D, kblock, D, scores, n, ws.k_t.data());

    if (!block_fully_visible(rule, qsum, ksum)) {
      uint8_t* vis = ws.visible.data();
      for (int64_t i = 0; i < qt.count; ++i) {
        const int32_t qp = qt.pos[i], qtag = qt.tag ? qt.tag[i] : 0;
        for (int64_t j = 0; j < n; ++j)
          vis[i * n + j] = key_visible(rule, qp, qtag, block.pos[j], block.tag ? block.tag[j] : 0);
      }
      for (int64_t g = 0; g < qt.group; ++g)
        for (int64_t i = 0; i < qt.count; ++i) {
          float* s = scores + (g * qt.count + i) * n;
          const uint8_t* vrow = vis + i * n;
          for (int64_t j = 0; j < n; ++j) s[j] = vrow[j] ? s[j] : -INFINITY;
        }
    }

    // Online softmax: scores become probabilities relative to the new running max.
    for (int64_t r = 0; r < rows; ++r) {
      float* s = scores + r * n;
      const float m_new = row_max(s, n, out.m[r]);
      if (m_new == -INFINITY) {  // nothing visible to this row yet
        std::fill(s, s + n, 0.f);
        continue;
      }
      const float alpha = exp2f(out.m[r] - m_new);  // 0 when m was -inf
      const float sum = exp2_shifted_inplace(s, n, m_new);
      out.l[r] = out.l[r] * alpha + sum;
      out.m[r] = m_new;
      if (alpha != 1.f) scale_row(out.acc + r * D, D, alpha);
    }

    // acc[rows, D] += P[rows, n] . V_block[n, D]
    const float* vblock = block_as_float(kr.v, kr.v_stride, block, n, D, ws.v.data());
    gemm_ab_accumulate(rows, D, n, scores, n, vblock, D, out.acc, D);
  }
}

// out_row[d] = acc[d] / l (zeros when no key was visible).
template <typename scalar_t>
void write_normalised(const float* acc, float l, int64_t head_dim, scalar_t* out_row) {
  const float inv = l > 0.f ? 1.f / l : 0.f;
  for (int64_t d = 0; d < head_dim; ++d) out_row[d] = static_cast<scalar_t>(acc[d] * inv);
}

}  // namespace skiplayers::cpu
