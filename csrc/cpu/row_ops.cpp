// CPU kernels that move rows: compaction of a packed ragged batch, the cache write at per-sequence
// offsets, and per-sequence cache compaction. They copy bytes, so one kernel serves every dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "../common/op_checks.h"
#include "host_checks.h"

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
                      const at::Tensor& tag_cache, const at::Tensor& k_in, const at::Tensor& v_in,
                      const at::Tensor& pos_in, const at::Tensor& tag_in, const at::Tensor& cu_seqlens,
                      const at::Tensor& cache_seqlens) {
  check_cache_append(k_cache, v_cache, pos_cache, tag_cache, k_in, v_in, pos_in, tag_in, cu_seqlens, cache_seqlens);
  const at::Tensor k = k_in.contiguous(), v = v_in.contiguous(), pos = pos_in.contiguous(), tag = tag_in.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous(), lens = cache_seqlens.contiguous();
  check_cu_seqlens(cu, k.size(0), "skiplayers::cache_append", "cu_seqlens");
  const int64_t batch = k_cache.size(0), capacity = k_cache.size(1);
  const int32_t* c = cu.data_ptr<int32_t>();
  const int32_t* len = lens.data_ptr<int32_t>();

  std::vector<int64_t> src, dst;  // dst: flat slot index b * capacity + s
  src.reserve(k.size(0));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = c[b + 1] - c[b];
    TORCH_CHECK(len[b] >= 0 && len[b] + n <= capacity, "skiplayers::cache_append: sequence ", b, " holds ", len[b],
                " slots and appends ", n, ", but the cache has capacity ", capacity);
    for (int64_t i = 0; i < n; ++i) {
      src.push_back(c[b] + i);
      dst.push_back(b * capacity + len[b] + i);
    }
  }
  const int64_t kv_row = k.size(1) * k.size(2) * k.element_size();
  copy_rows(k.data_ptr(), k_cache.data_ptr(), kv_row, src, dst);
  copy_rows(v.data_ptr(), v_cache.data_ptr(), kv_row, src, dst);
  copy_rows(pos.data_ptr(), pos_cache.data_ptr(), sizeof(int32_t), src, dst);
  copy_rows(tag.data_ptr(), tag_cache.data_ptr(), sizeof(int32_t), src, dst);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cache_compact_cpu(
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos_cache, const at::Tensor& tag_cache,
    const at::Tensor& cache_seqlens, const at::Tensor& keep, int64_t capacity) {
  check_cache_compact(k_cache, v_cache, pos_cache, tag_cache, cache_seqlens, keep, capacity);
  const at::Tensor lens = cache_seqlens.contiguous();
  check_cache_lengths(lens, k_cache.size(1), "skiplayers::cache_compact");
  const int64_t batch = k_cache.size(0), old_capacity = k_cache.size(1);
  const int32_t* len = lens.data_ptr<int32_t>();
  const bool* kp = keep.data_ptr<bool>();

  at::Tensor new_lens = at::empty({batch}, lens.options());
  int32_t* nl = new_lens.data_ptr<int32_t>();
  std::vector<int64_t> src, dst;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t kept = 0;
    for (int64_t s = 0; s < len[b]; ++s)
      if (kp[b * old_capacity + s]) {
        src.push_back(b * old_capacity + s);
        dst.push_back(b * capacity + kept++);
      }
    TORCH_CHECK(kept <= capacity, "skiplayers::cache_compact: sequence ", b, " keeps ", kept,
                " slots, more than the new capacity ", capacity);
    nl[b] = static_cast<int32_t>(kept);
  }
  at::Tensor nk = at::empty({batch, capacity, k_cache.size(2), k_cache.size(3)}, k_cache.options());
  at::Tensor nv = at::empty(nk.sizes(), nk.options());
  at::Tensor npos = at::empty({batch, capacity}, pos_cache.options());
  at::Tensor ntag = at::empty({batch, capacity}, tag_cache.options());
  const int64_t kv_row = k_cache.size(2) * k_cache.size(3) * k_cache.element_size();
  copy_rows(k_cache.data_ptr(), nk.data_ptr(), kv_row, src, dst);
  copy_rows(v_cache.data_ptr(), nv.data_ptr(), kv_row, src, dst);
  copy_rows(pos_cache.data_ptr(), npos.data_ptr(), sizeof(int32_t), src, dst);
  copy_rows(tag_cache.data_ptr(), ntag.data_ptr(), sizeof(int32_t), src, dst);
  return {nk, nv, npos, ntag, new_lens};
}

}  // namespace

TORCH_LIBRARY_IMPL(skiplayers, CPU, m) {
  m.impl("compact_rows", &compact_rows_cpu);
  m.impl("cache_append", &cache_append_cpu);
  m.impl("cache_compact", &cache_compact_cpu);
}

}  // namespace skiplayers::cpu
