// CPU launchers of the two attention ops: enumerate (sequence, query tile, KV head[, key split])
// tasks, run them through the shared engine, merge key splits.
#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../common/op_checks.h"
#include "anchor_plan.h"
#include "attention_engine.h"
#include "host_checks.h"
#include "task_pool.h"

namespace skiplayers::cpu {
namespace {

// Query tokens per tile: the tile stacks `group` heads, so aim for ~384 GEMM rows (measured best
// with 128-key blocks on the dense causal T=2048 case; 192..384 rows and 64..256 keys are within 10%).
int64_t query_tile_tokens(int64_t group) { return std::clamp<int64_t>(384 / group, 8, 128); }

struct Task {
  int32_t batch;
  int32_t kv_head;
  int64_t q_begin;  // packed query rows [q_begin, q_end)
  int64_t q_end;
  int32_t split;
};

// Per-thread scratch plus room for one tile's partial result.
struct TileScratch {
  Scratch engine;
  std::vector<float> acc, m, l;

  PartialResult partial(int64_t rows, int64_t head_dim) {
    acc.resize(rows * head_dim);
    m.resize(rows);
    l.resize(rows);
    PartialResult p{acc.data(), m.data(), l.data()};
    init_partial(p, rows, head_dim);
    return p;
  }
};

TileScratch& thread_scratch() {
  thread_local TileScratch scratch;
  return scratch;
}

template <typename scalar_t>
QueryTile<scalar_t> query_tile(const at::Tensor& q, const int32_t* q_pos, const int32_t* q_tag, const Task& t,
                               int64_t group) {
  const scalar_t* base = q.data_ptr<scalar_t>() + t.q_begin * q.stride(0) + t.kv_head * group * q.stride(1);
  return QueryTile<scalar_t>{base,          q.stride(0), q.stride(1), q_pos + t.q_begin,
                             q_tag ? q_tag + t.q_begin : nullptr, t.q_end - t.q_begin, group};
}

template <typename scalar_t>
void write_tile(const PartialResult& p, const Task& t, int64_t group, int64_t head_dim, at::Tensor& out) {
  const int64_t count = t.q_end - t.q_begin;
  scalar_t* o = out.data_ptr<scalar_t>();
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r = g * count + i;
      scalar_t* row = o + ((t.q_begin + i) * out.size(1) + t.kv_head * group + g) * head_dim;
      write_normalised(p.acc + r * head_dim, p.l[r], head_dim, row);
    }
}

int64_t count_tiles(const int32_t* cu_q, int64_t batch, int64_t tile) {
  int64_t tiles = 0;
  for (int64_t b = 0; b < batch; ++b) tiles += ceil_div(cu_q[b + 1] - cu_q[b], tile);
  return tiles;
}

std::vector<Task> tile_tasks(const int32_t* cu_q, int64_t batch, int64_t kv_heads, int64_t tile, int64_t splits) {
  std::vector<Task> tasks;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t q0 = cu_q[b]; q0 < cu_q[b + 1]; q0 += tile)
      for (int64_t h = 0; h < kv_heads; ++h)
        for (int64_t s = 0; s < splits; ++s)
          tasks.push_back(Task{static_cast<int32_t>(b), static_cast<int32_t>(h), q0,
                               std::min<int64_t>(q0 + tile, cu_q[b + 1]), static_cast<int32_t>(s)});
  // Later tiles of a sequence see more keys under causality: run them first.
  std::reverse(tasks.begin(), tasks.end());
  return tasks;
}

const int32_t* optional_int_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<int32_t>() : nullptr;
}

at::Tensor varlen_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                const at::Tensor& q_pos_in, const at::Tensor& k_pos_in,
                                const std::optional<at::Tensor>& q_tag_in, const std::optional<at::Tensor>& k_tag_in,
                                int64_t rule, double scale) {
  const AttentionShape s =
      check_varlen_attention(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, q_pos_in, k_pos_in, q_tag_in, k_tag_in, rule);
  const at::Tensor q = dense_last_dim(q_in), k = dense_last_dim(k_in), v = dense_last_dim(v_in);
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const at::Tensor q_pos = q_pos_in.contiguous(), k_pos = k_pos_in.contiguous();
  const std::optional<at::Tensor> q_tag = q_tag_in ? std::optional(q_tag_in->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> k_tag = k_tag_in ? std::optional(k_tag_in->contiguous()) : std::nullopt;
  check_cu_seqlens(cu_q, q.size(0), "skiplayers::varlen_attention", "cu_seqlens_q");
  check_cu_seqlens(cu_k, k.size(0), "skiplayers::varlen_attention", "cu_seqlens_k");

  at::Tensor out = at::empty({s.num_queries, s.heads, s.head_dim}, q.options());
  if (s.empty()) return out;
  const int64_t group = s.heads / s.kv_heads;
  const std::vector<Task> tasks =
      tile_tasks(cu_q.data_ptr<int32_t>(), s.batch, s.kv_heads, query_tile_tokens(group), /*splits=*/1);
  const int32_t* cuk = cu_k.data_ptr<int32_t>();
  const AnchorPlan plan = make_anchor_plan(rule, k, v, cuk, s.batch, k_pos.data_ptr<int32_t>(), optional_int_ptr(k_tag));

  AT_DISPATCH_V2(q.scalar_type(), "varlen_attention_cpu", AT_WRAP([&] {
    run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t ti) {
      const Task& t = tasks[ti];
      const QueryTile<scalar_t> qt = query_tile<scalar_t>(q, q_pos.data_ptr<int32_t>(), optional_int_ptr(q_tag), t, group);
      const int64_t k0 = cuk[t.batch], k1 = cuk[t.batch + 1];
      KeyRun<scalar_t> kr{k.data_ptr<scalar_t>() + k0 * k.stride(0) + t.kv_head * k.stride(1),
                          v.data_ptr<scalar_t>() + k0 * v.stride(0) + t.kv_head * v.stride(1),
                          k.stride(0),
                          v.stride(0),
                          k_pos.data_ptr<int32_t>() + k0,
                          k_tag ? k_tag->data_ptr<int32_t>() + k0 : nullptr,
                          0,
                          k1 - k0};
      TileScratch& ws = thread_scratch();
      PartialResult p = ws.partial(group * qt.count, s.head_dim);
      if (plan.enabled && plan.ordered[t.batch]) {
        // AnSAN: earlier sentences' anchors (gathered), then the keys from the tile's first sentence on.
        // Absent query tags are all zero: every query is in sentence 0.
        int32_t first_sentence = qt.tag ? tag_sentence(qt.tag[0]) : 0;
        for (int64_t i = 1; qt.tag && i < qt.count; ++i)
          first_sentence = std::min(first_sentence, tag_sentence(qt.tag[i]));
        kr.begin = first_key_of_sentence(kr.tag, k1 - k0, first_sentence);
        int64_t g0, g1;
        plan.anchors_before(t.batch, kr.begin, &g0, &g1);
        const KeyRun<scalar_t> anchors{plan.k.data_ptr<scalar_t>() + t.kv_head * plan.k.stride(1),
                                       plan.v.data_ptr<scalar_t>() + t.kv_head * plan.v.stride(1),
                                       plan.k.stride(0),
                                       plan.v.stride(0),
                                       plan.pos.data_ptr<int32_t>(),
                                       plan.tag.data_ptr<int32_t>(),
                                       g0,
                                       g1};
        attend(qt, anchors, s.head_dim, rule, static_cast<float>(scale), p, ws.engine);
      }
      attend(qt, kr, s.head_dim, rule, static_cast<float>(scale), p, ws.engine);
      write_tile<scalar_t>(p, t, group, s.head_dim, out);
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return out;
}

// Split-K factor: enough tasks to keep every thread busy, but each split at least 4 key blocks.
int64_t choose_splits(int64_t base_tasks, int64_t max_keys) {
  const int64_t want = at::get_num_threads() * 4;
  if (base_tasks >= want) return 1;
  const int64_t by_threads = ceil_div(want, base_tasks);
  const int64_t by_length = std::max<int64_t>(1, max_keys / (4 * kKeyBlock));
  return std::max<int64_t>(1, std::min(by_threads, by_length));
}

at::Tensor cache_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_cache_in, const at::Tensor& v_cache_in,
                               const at::Tensor& block_table, const at::Tensor& cu_seqlens_q,
                               const at::Tensor& cache_seqlens_in, const at::Tensor& q_pos_in,
                               const at::Tensor& pos_cache, const std::optional<at::Tensor>& q_tag_in,
                               const std::optional<at::Tensor>& tag_cache, int64_t rule, double scale,
                               int64_t num_splits) {
  const AttentionShape s =
      check_cache_attention(q_in, k_cache_in, v_cache_in, block_table, cu_seqlens_q, cache_seqlens_in, q_pos_in,
                            pos_cache, q_tag_in, tag_cache, rule, num_splits);
  const at::Tensor q = dense_last_dim(q_in);
  const PoolSlots k_cache = pool_slots(k_cache_in), v_cache = pool_slots(v_cache_in);
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), lens = cache_seqlens_in.contiguous();
  const at::Tensor q_pos = q_pos_in.contiguous();
  const std::optional<at::Tensor> q_tag = q_tag_in ? std::optional(q_tag_in->contiguous()) : std::nullopt;
  const int64_t page_size = k_cache.pool.size(1);
  check_cu_seqlens(cu_q, q.size(0), "skiplayers::cache_attention", "cu_seqlens_q");
  check_paged_slots(block_table, lens.data_ptr<int32_t>(), nullptr, k_cache.pool.size(0), page_size,
                    "skiplayers::cache_attention");

  at::Tensor out = at::empty({s.num_queries, s.heads, s.head_dim}, q.options());
  if (s.empty()) return out;
  const int64_t group = s.heads / s.kv_heads;
  const int64_t tile = query_tile_tokens(group);
  const int32_t* len = lens.data_ptr<int32_t>();
  const int64_t max_keys = s.batch ? *std::max_element(len, len + s.batch) : 0;
  const int64_t base_tasks = count_tiles(cu_q.data_ptr<int32_t>(), s.batch, tile) * s.kv_heads;
  const int64_t splits = num_splits > 0 ? num_splits : choose_splits(base_tasks, max_keys);
  const std::vector<Task> tasks = tile_tasks(cu_q.data_ptr<int32_t>(), s.batch, s.kv_heads, tile, splits);
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int64_t max_pages = block_table.size(1);
  const int64_t rows_max = group * tile;

  // With splits, every task leaves its partial result here and a second pass merges them.
  std::vector<float> part_acc, part_m, part_l;
  if (splits > 1) {
    part_acc.resize(tasks.size() * rows_max * s.head_dim);
    part_m.resize(tasks.size() * rows_max);
    part_l.resize(tasks.size() * rows_max);
  }

  AT_DISPATCH_V2(q.scalar_type(), "cache_attention_cpu", AT_WRAP([&] {
    run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t ti) {
      const Task& t = tasks[ti];
      const QueryTile<scalar_t> qt = query_tile<scalar_t>(q, q_pos.data_ptr<int32_t>(), optional_int_ptr(q_tag), t, group);
      int64_t k_begin, k_end;
      split_key_range(len[t.batch], splits, t.split, kKeyBlock, &k_begin, &k_end);
      const KeyRun<scalar_t> kr{k_cache.pool.data_ptr<scalar_t>() + t.kv_head * k_cache.head_stride,
                                v_cache.pool.data_ptr<scalar_t>() + t.kv_head * v_cache.head_stride,
                                k_cache.slot_stride,
                                v_cache.slot_stride,
                                pos_cache.data_ptr<int32_t>(),
                                tag_cache ? tag_cache->data_ptr<int32_t>() : nullptr,
                                k_begin,
                                k_end,
                                table + t.batch * max_pages,
                                page_size};
      const int64_t rows = group * qt.count;
      TileScratch& ws = thread_scratch();
      PartialResult p = splits > 1 ? PartialResult{part_acc.data() + ti * rows_max * s.head_dim,
                                                   part_m.data() + ti * rows_max, part_l.data() + ti * rows_max}
                                   : ws.partial(rows, s.head_dim);
      if (splits > 1) init_partial(p, rows, s.head_dim);
      attend(qt, kr, s.head_dim, rule, static_cast<float>(scale), p, ws.engine);
      if (splits == 1) write_tile<scalar_t>(p, t, group, s.head_dim, out);
    });

    if (splits > 1) {
      // Tasks of one tile are `splits` consecutive entries (reversed order: split splits-1 first).
      const int64_t tiles = static_cast<int64_t>(tasks.size()) / splits;
      run_tasks(tiles, [&](int64_t tile_index) {
        const int64_t first = tile_index * splits;
        const Task& t = tasks[first];
        const int64_t rows = group * (t.q_end - t.q_begin);
        TileScratch& ws = thread_scratch();
        PartialResult merged = ws.partial(rows, s.head_dim);
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int64_t ti = first + sp;
          for (int64_t r = 0; r < rows; ++r) {
            float m, l;
            const MergeFactors f = merge_softmax_stats(merged.m[r], merged.l[r], part_m[ti * rows_max + r],
                                                       part_l[ti * rows_max + r], &m, &l);
            float* acc = merged.acc + r * s.head_dim;
            const float* other = part_acc.data() + (ti * rows_max + r) * s.head_dim;
            for (int64_t d = 0; d < s.head_dim; ++d) acc[d] = acc[d] * f.a + other[d] * f.b;
            merged.m[r] = m;
            merged.l[r] = l;
          }
        }
        write_tile<scalar_t>(merged, t, group, s.head_dim, out);
      });
    }
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(skiplayers, CPU, m) {
  m.impl("varlen_attention", &varlen_attention_cpu);
  m.impl("cache_attention", &cache_attention_cpu);
}

}  // namespace skiplayers::cpu
