// CPU kernels that move rows: compaction of a packed ragged batch, the paged cache write at
// per-sequence offsets, and per-sequence compaction of a paged cache in place. They copy bytes, so
// one kernel serves every dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "../common/op_checks.h"
#include "host_checks.h"
#include "skiplayers/ragged.h"

namespace skiplayers::cpu {
namespace {

// Copies rows of `row_bytes` bytes: dst row dst_index[i] <- src row src_index[i].
void copy_rows(const void* src_base, void* dst_base, int64_t row_bytes, const std::vector<int64_t>& src_index,
               const std::vector<int64_t>& dst_index) {
  const char* src = static_cast<const char*>(src_base);
  char* dst = static_cast<char*>(dst_base);
  const int64_t rows = static_cast<int64_t>(src_index.size());
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      std::memcpy(dst + dst_index[i] * row_bytes, src + src_index[i] * row_bytes, row_bytes);
  });
}

std::tuple<at::Tensor, at::Tensor> compact_rows_cpu(const at::Tensor& x_in, const at::Tensor& cu_seqlens,
                                                    const at::Tensor& keep_in) {
  check_compact_rows(x_in, cu_seqlens, keep_in);
  const at::Tensor x = x_in.contiguous(), keep = keep_in.contiguous(), cu = cu_seqlens.contiguous();
  check_cu_seqlens(cu, x.size(0), "skiplayers::compact_rows", "cu_seqlens");
  const int64_t batch = cu.size(0) - 1;
  const int32_t* c = cu.data_ptr<int32_t>();
  const bool* k = keep.data_ptr<bool>();

  at::Tensor new_cu = at::empty({batch + 1}, cu.options());
  int32_t* nc = new_cu.data_ptr<int32_t>();
  std::vector<int64_t> src, dst;
  src.reserve(x.size(0));
  nc[0] = 0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t r = c[b]; r < c[b + 1]; ++r)
      if (k[r]) src.push_back(r);
    nc[b + 1] = static_cast<int32_t>(src.size());
  }
  dst.resize(src.size());
  for (size_t i = 0; i < dst.size(); ++i) dst[i] = static_cast<int64_t>(i);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape[0] = static_cast<int64_t>(src.size());
  at::Tensor out = at::empty(out_shape, x.options());
  const int64_t row_bytes = x.size(0) ? x.nbytes() / x.size(0) : 0;
  copy_rows(x.data_ptr(), out.data_ptr(), row_bytes, src, dst);
  return {out, new_cu};
}

void cache_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos_cache,
                      const at::Tensor& tag_cache, const at::Tensor& block_table, const at::Tensor& k_in,
                      const at::Tensor& v_in, const at::Tensor& pos_in, const at::Tensor& tag_in,
                      const at::Tensor& cu_seqlens, const at::Tensor& cache_seqlens) {
  const char* op = "skiplayers::cache_append";
  check_cache_append(k_cache, v_cache, pos_cache, tag_cache, block_table, k_in, v_in, pos_in, tag_in, cu_seqlens,
                     cache_seqlens);
  const at::Tensor k = k_in.contiguous(), v = v_in.contiguous(), pos = pos_in.contiguous(), tag = tag_in.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous(), lens = cache_seqlens.contiguous();
  check_cu_seqlens(cu, k.size(0), op, "cu_seqlens");
  const int64_t batch = block_table.size(0), max_pages = block_table.size(1), page_size = k_cache.size(1);
  const int32_t* c = cu.data_ptr<int32_t>();
  const int32_t* len = lens.data_ptr<int32_t>();
  std::vector<int32_t> added(batch);
  for (int64_t b = 0; b < batch; ++b) added[b] = c[b + 1] - c[b];
  check_paged_slots(block_table, len, added.data(), k_cache.size(0), page_size, op);

  const int32_t* table = block_table.data_ptr<int32_t>();
  std::vector<int64_t> src, dst;  // dst: flat slot index of the pools
  src.reserve(k.size(0));
  dst.reserve(k.size(0));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < added[b]; ++i) {
      src.push_back(c[b] + i);
      dst.push_back(paged_slot(table + b * max_pages, page_size, len[b] + i));
    }
  const int64_t kv_row = k.size(1) * k.size(2) * k.element_size();
  copy_rows(k.data_ptr(), k_cache.data_ptr(), kv_row, src, dst);
  copy_rows(v.data_ptr(), v_cache.data_ptr(), kv_row, src, dst);
  copy_rows(pos.data_ptr(), pos_cache.data_ptr(), sizeof(int32_t), src, dst);
  copy_rows(tag.data_ptr(), tag_cache.data_ptr(), sizeof(int32_t), src, dst);
}

at::Tensor cache_compact_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos_cache,
                             const at::Tensor& tag_cache, const at::Tensor& block_table,
                             const at::Tensor& cache_seqlens, const at::Tensor& keep) {
  const char* op = "skiplayers::cache_compact";
  check_cache_compact(k_cache, v_cache, pos_cache, tag_cache, block_table, cache_seqlens, keep);
  const at::Tensor lens = cache_seqlens.contiguous();
  const int64_t batch = block_table.size(0), max_pages = block_table.size(1), page_size = k_cache.size(1);
  const int32_t* len = lens.data_ptr<int32_t>();
  check_paged_slots(block_table, len, nullptr, k_cache.size(0), page_size, op);
  const int32_t* table = block_table.data_ptr<int32_t>();
  const bool* kp = keep.data_ptr<bool>();
  const int64_t slots = keep.size(1);

  at::Tensor new_lens = at::empty({batch}, lens.options());
  int32_t* nl = new_lens.data_ptr<int32_t>();
  const int64_t kv_row = k_cache.size(2) * k_cache.size(3) * k_cache.element_size();
  char* pools[] = {static_cast<char*>(k_cache.data_ptr()), static_cast<char*>(v_cache.data_ptr()),
                   static_cast<char*>(pos_cache.data_ptr()), static_cast<char*>(tag_cache.data_ptr())};
  const int64_t row_bytes[] = {kv_row, kv_row, sizeof(int32_t), sizeof(int32_t)};
  // A sequence's kept slots move towards its front in slot order: a slot is read before any later
  // kept slot can be written over it, so the move is safe in place. Sequences own disjoint pages.
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int32_t* row = table + b * max_pages;
      int64_t kept = 0;
      for (int64_t s = 0; s < len[b]; ++s) {
        if (!kp[b * slots + s]) continue;
        if (kept != s) {
          const int64_t from = paged_slot(row, page_size, s), to = paged_slot(row, page_size, kept);
          for (int i = 0; i < 4; ++i)
            std::memcpy(pools[i] + to * row_bytes[i], pools[i] + from * row_bytes[i], row_bytes[i]);
        }
        ++kept;
      }
      nl[b] = static_cast<int32_t>(kept);
    }
  });
  return new_lens;
}

}  // namespace

TORCH_LIBRARY_IMPL(skiplayers, CPU, m) {
  m.impl("compact_rows", &compact_rows_cpu);
  m.impl("cache_append", &cache_append_cpu);
  m.impl("cache_compact", &cache_compact_cpu);
}

}  // namespace skiplayers::cpu
