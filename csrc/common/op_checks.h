// Input checks shared by every compiled backend's launchers (CPU and CUDA), so that bad input gets
// the same clear message whichever backend runs. Torch-facing (unlike csrc/include/skiplayers/).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "skiplayers/visibility.h"

namespace skiplayers {

struct AttentionShape {
  int64_t batch;
  int64_t num_queries;  // packed query rows
  int64_t heads;
  int64_t kv_heads;
  int64_t head_dim;

  // Nothing to compute: no query rows, or no query heads (legal: 0 is a multiple of any KV head
  // count). Launchers return the empty output before sizing any tile by `heads / kv_heads`.
  bool empty() const { return num_queries == 0 || heads == 0; }
};

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but q is on ", ref.device());
}

inline void check_int32_vector(const at::Tensor& t, int64_t length, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, op, ": ", name, " must have shape [", length, "], got ",
              t.sizes());
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dt);
}

inline void check_rule(int64_t rule, const char* op) {
  TORCH_CHECK((rule & ~kRuleAllBits) == 0, op, ": unknown bits in rule ", rule);
}

// The last dimension must be dense; rows and heads may be strided (views of a fused projection).
inline at::Tensor dense_last_dim(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// A paged K/V pool [num_pages, page_size, heads, D] (D dense) as the kernels address it: flat slot
// page * page_size + offset (ragged.h paged_slot) at flat_slot * slot_stride, head at head *
// head_stride. That needs pages page_size slot strides apart, which holds for contiguous pools and
// for views that stride only the heads; any other view is made contiguous first. Torch gives dims
// of size 1 any stride: with one slot a page, a slot is a page apart; with one page, the page
// stride does not matter.
struct PoolSlots {
  at::Tensor pool;
  int64_t slot_stride;  // elements
  int64_t head_stride;  // elements
};

inline PoolSlots pool_slots(const at::Tensor& pool_in) {
  const auto flat = [](const at::Tensor& t) {
    return t.size(0) <= 1 || t.size(1) == 1 || t.stride(0) == t.size(1) * t.stride(1);
  };
  const at::Tensor pool = flat(pool_in) ? pool_in : pool_in.contiguous();
  return PoolSlots{pool, pool.size(1) == 1 ? pool.stride(0) : pool.stride(1), pool.stride(2)};
}

inline AttentionShape check_query(const at::Tensor& q, const at::Tensor& cu_seqlens_q, const at::Tensor& q_pos,
                                  const std::optional<at::Tensor>& q_tag, int64_t kv_heads, int64_t head_dim,
                                  const char* op) {
  check_float_dtype(q, op, "q");
  TORCH_CHECK(q.dim() == 3, op, ": q must be [total_q, heads, head_dim], got ", q.sizes());
  TORCH_CHECK(q.size(2) == head_dim, op, ": q head_dim ", q.size(2), " differs from the keys' ", head_dim);
  TORCH_CHECK(kv_heads > 0 && q.size(1) % kv_heads == 0, op, ": query heads (", q.size(1),
              ") must be a multiple of KV heads (", kv_heads, ")");
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1, op, ": cu_seqlens_q must be [B + 1]");
  check_int32_vector(cu_seqlens_q, cu_seqlens_q.size(0), op, "cu_seqlens_q");
  check_int32_vector(q_pos, q.size(0), op, "q_pos");
  if (q_tag) check_int32_vector(*q_tag, q.size(0), op, "q_tag");
  for (const at::Tensor* t : {&cu_seqlens_q, &q_pos}) check_same_device(q, *t, op, "metadata");
  if (q_tag) check_same_device(q, *q_tag, op, "q_tag");
  return AttentionShape{cu_seqlens_q.size(0) - 1, q.size(0), q.size(1), kv_heads, head_dim};
}

inline AttentionShape check_varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                             const at::Tensor& q_pos, const at::Tensor& k_pos,
                                             const std::optional<at::Tensor>& q_tag,
                                             const std::optional<at::Tensor>& k_tag, int64_t rule) {
  const char* op = "skiplayers::varlen_attention";
  check_rule(rule, op);
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), op, ": k and v must both be [total_k, kv_heads, head_dim], got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  AttentionShape s = check_query(q, cu_seqlens_q, q_pos, q_tag, k.size(1), k.size(2), op);
  check_int32_vector(cu_seqlens_k, s.batch + 1, op, "cu_seqlens_k");
  check_int32_vector(k_pos, k.size(0), op, "k_pos");
  if (k_tag) check_int32_vector(*k_tag, k.size(0), op, "k_tag");
  for (const at::Tensor* t : {&k, &v, &cu_seqlens_k, &k_pos}) check_same_device(q, *t, op, "k/v/metadata");
  if (k_tag) check_same_device(q, *k_tag, op, "k_tag");
  return s;
}

// A paged cache's K/V pools: [num_pages, page_size, kv_heads, head_dim] of one dtype, head_dim dense;
// the ops that write them (append, compact) need them contiguous.
inline void check_kv_pages(const at::Tensor& k_cache, const at::Tensor& v_cache, bool contiguous, const char* op) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), op,
              ": k_cache and v_cache must both be pages [num_pages, page_size, kv_heads, head_dim], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), op, ": k_cache and v_cache must share a dtype");
  TORCH_CHECK(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1, op, ": cache head_dim must be contiguous");
  TORCH_CHECK(!contiguous || (k_cache.is_contiguous() && v_cache.is_contiguous()), op,
              ": k_cache and v_cache must be contiguous");
}

// Slot metadata pages: contiguous int32 [num_pages, page_size], like the K/V pools' first two dims.
inline void check_metadata_pages(const at::Tensor& t, const at::Tensor& k_cache, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 2 && t.size(0) == k_cache.size(0) &&
                  t.size(1) == k_cache.size(1) && t.is_contiguous(),
              op, ": ", name, " must be contiguous int32 [num_pages, page_size] = [", k_cache.size(0), ", ",
              k_cache.size(1), "], got ", t.scalar_type(), " ", t.sizes());
}

// block_table: contiguous int32 [B, max_pages].
inline void check_block_table(const at::Tensor& block_table, int64_t batch, const char* op) {
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.size(0) == batch &&
                  block_table.is_contiguous(),
              op, ": block_table must be contiguous int32 [B, max_pages] with B = ", batch, ", got ",
              block_table.scalar_type(), " ", block_table.sizes());
}

// The most slots a sequence can hold: its block table row's pages.
inline int64_t slots_per_sequence(const at::Tensor& block_table, const at::Tensor& k_cache) {
  return block_table.size(1) * k_cache.size(1);
}

inline AttentionShape check_cache_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                            const at::Tensor& block_table, const at::Tensor& cu_seqlens_q,
                                            const at::Tensor& cache_seqlens, const at::Tensor& q_pos,
                                            const at::Tensor& pos_cache, const std::optional<at::Tensor>& q_tag,
                                            const std::optional<at::Tensor>& tag_cache, int64_t rule,
                                            int64_t num_splits) {
  const char* op = "skiplayers::cache_attention";
  check_rule(rule, op);
  TORCH_CHECK(num_splits >= 0, op, ": num_splits must be >= 0 (0 = automatic), got ", num_splits);
  check_kv_pages(k_cache, v_cache, /*contiguous=*/false, op);
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type(), op, ": q and the caches must share a dtype");
  AttentionShape s = check_query(q, cu_seqlens_q, q_pos, q_tag, k_cache.size(2), k_cache.size(3), op);
  check_block_table(block_table, s.batch, op);
  check_int32_vector(cache_seqlens, s.batch, op, "cache_seqlens");
  check_metadata_pages(pos_cache, k_cache, op, "pos_cache");
  if (tag_cache) {
    check_metadata_pages(*tag_cache, k_cache, op, "tag_cache");
    check_same_device(q, *tag_cache, op, "tag_cache");
  }
  for (const at::Tensor* t : {&k_cache, &v_cache, &block_table, &cache_seqlens, &pos_cache})
    check_same_device(q, *t, op, "cache");
  return s;
}

inline void check_compact_rows(const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& keep) {
  const char* op = "skiplayers::compact_rows";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a row dimension");
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.dim() == 1 && keep.size(0) == x.size(0), op,
              ": keep must be bool [", x.size(0), "], got ", keep.scalar_type(), " ", keep.sizes());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, op, ": cu_seqlens must be [B + 1]");
  check_int32_vector(cu_seqlens, cu_seqlens.size(0), op, "cu_seqlens");
  check_same_device(x, keep, op, "keep");
  check_same_device(x, cu_seqlens, op, "cu_seqlens");
}

// A paged cache's pools, as the writing ops need them: contiguous K/V pages of one dtype and
// contiguous int32 pos/tag pages.
inline void check_cache_pages(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos_cache,
                              const at::Tensor& tag_cache, const char* op) {
  check_kv_pages(k_cache, v_cache, /*contiguous=*/true, op);
  check_metadata_pages(pos_cache, k_cache, op, "pos_cache");
  check_metadata_pages(tag_cache, k_cache, op, "tag_cache");
}

inline void check_cache_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos_cache,
                               const at::Tensor& tag_cache, const at::Tensor& block_table, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& pos, const at::Tensor& tag,
                               const at::Tensor& cu_seqlens, const at::Tensor& cache_seqlens) {
  const char* op = "skiplayers::cache_append";
  check_cache_pages(k_cache, v_cache, pos_cache, tag_cache, op);
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3),
              op, ": k and v must be [total, kv_heads, head_dim] matching the cache, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type(), op,
              ": k, v and the caches must share a dtype");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, op, ": cu_seqlens must be [B + 1]");
  const int64_t batch = cu_seqlens.size(0) - 1;
  check_block_table(block_table, batch, op);
  check_int32_vector(pos, k.size(0), op, "pos");
  check_int32_vector(tag, k.size(0), op, "tag");
  check_int32_vector(cu_seqlens, batch + 1, op, "cu_seqlens");
  check_int32_vector(cache_seqlens, batch, op, "cache_seqlens");
  for (const at::Tensor* t :
       {&v_cache, &pos_cache, &tag_cache, &block_table, &k, &v, &pos, &tag, &cu_seqlens, &cache_seqlens})
    check_same_device(k_cache, *t, op, "input");
}

inline void check_cache_compact(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos_cache,
                                const at::Tensor& tag_cache, const at::Tensor& block_table,
                                const at::Tensor& cache_seqlens, const at::Tensor& keep) {
  const char* op = "skiplayers::cache_compact";
  check_cache_pages(k_cache, v_cache, pos_cache, tag_cache, op);
  TORCH_CHECK(cache_seqlens.dim() == 1, op, ": cache_seqlens must be [B]");
  const int64_t batch = cache_seqlens.size(0);
  check_int32_vector(cache_seqlens, batch, op, "cache_seqlens");
  check_block_table(block_table, batch, op);
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.dim() == 2 && keep.size(0) == batch &&
                  keep.size(1) == slots_per_sequence(block_table, k_cache) && keep.is_contiguous(),
              op, ": keep must be contiguous bool [B, max_pages * page_size] = [", batch, ", ",
              slots_per_sequence(block_table, k_cache), "], got ", keep.scalar_type(), " ", keep.sizes());
  for (const at::Tensor* t : {&v_cache, &pos_cache, &tag_cache, &block_table, &cache_seqlens, &keep})
    check_same_device(k_cache, *t, op, "input");
}

}  // namespace skiplayers
