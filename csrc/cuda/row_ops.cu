// CUDA launchers of the row-moving ops: compact_rows, cache_append, cache_compact
// (kernels in row_kernels.cuh). They copy bytes, so one kernel serves every dtype.
//
// Host synchronisation:
//   compact_rows   one (its output size, the number of kept rows, is data-dependent); the same
//                  copy brings back the validity of cu_seqlens, checked with a clear error.
//   cache_append   none (capturable in a CUDA graph); metadata values (cu_seqlens, the lengths
//                  against the block table, the block table entries written through) are checked
//                  on the device.
//   cache_compact  none (capturable): in place, it returns the new lengths on the device; the
//                  lengths and the block table entries of the slots in use are checked on the device.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <tuple>
#include <vector>

#include "../common/op_checks.h"
#include "launch_utils.h"
#include "row_kernels.cuh"

namespace skiplayers::cuda {
namespace {

// Largest power of two <= 16 that divides every address and size in `xs`.
int32_t access_width(std::initializer_list<uint64_t> xs) {
  uint64_t w = 16;
  for (uint64_t x : xs)
    while (w > 1 && x % w != 0) w /= 2;
  return static_cast<int32_t>(w);
}

// A plane moving rows of `src` ([rows, heads, head elements], strided) into rows of `dst`.
// The widest access width that every address, stride and row size allows.
CopyPlane make_plane(const at::Tensor& src, const at::Tensor& dst, int64_t heads, int64_t head_elems,
                     int64_t src_row_stride, int64_t src_head_stride, int64_t dst_row_stride,
                     int64_t dst_head_stride) {
  const int64_t e = src.element_size();
  CopyPlane c;
  c.src = static_cast<const char*>(src.data_ptr());
  c.dst = static_cast<char*>(dst.data_ptr());
  c.src_row_stride = src_row_stride * e;
  c.src_head_stride = src_head_stride * e;
  c.dst_row_stride = dst_row_stride * e;
  c.dst_head_stride = dst_head_stride * e;
  c.heads = static_cast<int32_t>(heads);
  c.head_bytes = static_cast<int32_t>(head_elems * e);
  c.width = access_width({reinterpret_cast<uint64_t>(c.src), reinterpret_cast<uint64_t>(c.dst),
                          static_cast<uint64_t>(c.src_row_stride), static_cast<uint64_t>(c.src_head_stride),
                          static_cast<uint64_t>(c.dst_row_stride), static_cast<uint64_t>(c.dst_head_stride),
                          static_cast<uint64_t>(c.head_bytes)});
  return c;
}

// [rows, heads, D] tensor (strided rows and heads, dense D) into a contiguous [slots, heads, D] buffer.
CopyPlane rows_into_slots(const at::Tensor& src, const at::Tensor& dst) {
  const int64_t heads = src.size(1), d = src.size(2);
  return make_plane(src, dst, heads, d, src.stride(0), src.stride(1), heads * d, d);
}

// One int32 per row into one int32 per slot.
CopyPlane ints_into_slots(const at::Tensor& src, const at::Tensor& dst) {
  return make_plane(src, dst, 1, 1, src.stride(0), 1, 1, 1);
}

template <typename Map>
void copy_rows(const std::vector<CopyPlane>& planes, int64_t rows, const Map& map, cudaStream_t stream) {
  if (rows == 0) return;
  CopyPlanes all;
  all.count = static_cast<int32_t>(planes.size());
  for (size_t i = 0; i < planes.size(); ++i) all.plane[i] = planes[i];
  constexpr int64_t kWarps = kCopyThreads / 32;
  const int64_t blocks = std::min<int64_t>(ceil_div(rows, kWarps), 65536);  // grid-stride beyond
  copy_rows_kernel<Map><<<blocks, kCopyThreads, 0, stream>>>(all, rows, map);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> compact_rows_cuda(const at::Tensor& x_in, const at::Tensor& cu_seqlens,
                                                     const at::Tensor& keep_in) {
  const char* op = "skiplayers::compact_rows";
  check_compact_rows(x_in, cu_seqlens, keep_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), keep = keep_in.contiguous(), cu = cu_seqlens.contiguous();
  const int64_t n = x.size(0), batch = cu.size(0) - 1;
  TORCH_CHECK(n < (1ll << 31) - 2, op, " (CUDA): at most 2^31 - 3 rows");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // prefix[0..n] then status, in one buffer so one copy brings back both.
  at::Tensor scratch = at::empty({n + 2}, cu.options());
  at::Tensor new_cu = at::empty({batch + 1}, cu.options());
  int32_t* prefix = scratch.data_ptr<int32_t>();
  compact_rows_scan_kernel<<<1, kScanThreads, 0, stream>>>(keep.data_ptr<bool>(), static_cast<int32_t>(n),
                                                           cu.data_ptr<int32_t>(), static_cast<int32_t>(batch),
                                                           prefix, new_cu.data_ptr<int32_t>(), prefix + n + 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor host = scratch.narrow(0, n, 2).cpu();  // the one synchronisation
  TORCH_CHECK(host.data_ptr<int32_t>()[1] == 0, op, ": cu_seqlens must start at 0, be non-decreasing and end at the ",
              "number of rows (", n, ")");
  const int64_t kept = host.data_ptr<int32_t>()[0];

  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = kept;
  at::Tensor out = at::empty(shape, x.options());
  const int64_t row_elems = n ? x.numel() / n : 0;
  if (kept > 0 && row_elems > 0) {
    const CopyPlane plane = make_plane(x, out, 1, row_elems, row_elems, 0, row_elems, 0);
    copy_rows({plane}, n, CompactRowsMap{keep.data_ptr<bool>(), prefix}, stream);
  }
  return {out, new_cu};
}

void cache_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos_cache,
                       const at::Tensor& tag_cache, const at::Tensor& block_table, const at::Tensor& k_in,
                       const at::Tensor& v_in, const at::Tensor& pos_in, const at::Tensor& tag_in,
                       const at::Tensor& cu_seqlens, const at::Tensor& cache_seqlens) {
  check_cache_append(k_cache, v_cache, pos_cache, tag_cache, block_table, k_in, v_in, pos_in, tag_in, cu_seqlens,
                     cache_seqlens);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const at::Tensor k = dense_last_dim(k_in), v = dense_last_dim(v_in);
  const at::Tensor pos = pos_in.contiguous(), tag = tag_in.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous(), lens = cache_seqlens.contiguous();
  const int64_t rows = k.size(0);
  if (rows == 0) return;
  const int64_t batch = block_table.size(0), pool_slots = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(batch < (1ll << 31) && slots_per_sequence(block_table, k_cache) < (1ll << 31) &&
                  pool_slots < (1ll << 31),
              "skiplayers::cache_append (CUDA): at most 2^31 - 1 sequences, slots per sequence and slots in the pool");
  const CacheAppendMap map{cu.data_ptr<int32_t>(),
                           lens.data_ptr<int32_t>(),
                           block_table.data_ptr<int32_t>(),
                           static_cast<int32_t>(batch),
                           static_cast<int32_t>(block_table.size(1)),
                           static_cast<int32_t>(k_cache.size(1)),
                           static_cast<int32_t>(pool_slots),
                           rows};
  // The pools are contiguous (check_cache_append): flat slot i is row i of [num_pages * page_size, ...].
  copy_rows({rows_into_slots(k, k_cache), rows_into_slots(v, v_cache), ints_into_slots(pos, pos_cache),
             ints_into_slots(tag, tag_cache)},
            rows, map, at::cuda::getCurrentCUDAStream());
}

at::Tensor cache_compact_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos_cache,
                              const at::Tensor& tag_cache, const at::Tensor& block_table,
                              const at::Tensor& cache_seqlens, const at::Tensor& keep) {
  const char* op = "skiplayers::cache_compact";
  check_cache_compact(k_cache, v_cache, pos_cache, tag_cache, block_table, cache_seqlens, keep);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const int64_t batch = block_table.size(0), pool_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t row_bytes = k_cache.size(2) * k_cache.size(3) * k_cache.element_size();
  TORCH_CHECK(batch < (1ll << 31) && slots_per_sequence(block_table, k_cache) < (1ll << 31) &&
                  pool_slots < (1ll << 31),
              op, " (CUDA): at most 2^31 - 1 sequences, slots per sequence and slots in the pool");
  TORCH_CHECK(row_bytes <= (1 << 22), op, " (CUDA): at most 4 MiB per K/V slot, got ", row_bytes, " bytes");
  const at::Tensor lens = cache_seqlens.contiguous();
  at::Tensor new_lens = at::empty({batch}, lens.options());
  if (batch == 0) return new_lens;

  // The pools are contiguous (check_cache_compact): flat slot i at i * row_bytes.
  CacheCompactParams p;
  p.k_cache = static_cast<char*>(k_cache.data_ptr());
  p.v_cache = static_cast<char*>(v_cache.data_ptr());
  p.pos_cache = pos_cache.data_ptr<int32_t>();
  p.tag_cache = tag_cache.data_ptr<int32_t>();
  p.row_bytes = static_cast<int32_t>(row_bytes);
  p.width = row_bytes == 0 ? 16
                           : access_width({reinterpret_cast<uint64_t>(p.k_cache), reinterpret_cast<uint64_t>(p.v_cache),
                                           static_cast<uint64_t>(row_bytes)});
  p.block_table = block_table.data_ptr<int32_t>();
  p.cache_seqlens = lens.data_ptr<int32_t>();
  p.keep = keep.data_ptr<bool>();
  p.max_pages = static_cast<int32_t>(block_table.size(1));
  p.page_size = static_cast<int32_t>(k_cache.size(1));
  p.pool_slots = static_cast<int32_t>(pool_slots);
  p.new_lens = new_lens.data_ptr<int32_t>();
  cache_compact_kernel<<<batch, kCompactThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return new_lens;
}

}  // namespace

TORCH_LIBRARY_IMPL(skiplayers, CUDA, m) {
  m.impl("compact_rows", &compact_rows_cuda);
  m.impl("cache_append", &cache_append_cuda);
  m.impl("cache_compact", &cache_compact_cuda);
}

}  // namespace skiplayers::cuda
