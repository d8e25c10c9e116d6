// Kernels that move rows: compaction of a packed ragged batch (compact_rows), the cache write at
// per-sequence offsets (cache_append) and per-sequence cache compaction (cache_compact).
//
// Each op is (1) a map from source row to destination row, computed with a block-wide prefix sum
// where a mask decides, and (2) one generic copy kernel that moves every mapped row (a warp per
// row, the widest aligned vector the launcher found) for up to four "planes" at once (K, V, pos, tag).
#pragma once

#include <type_traits>

#include "device_common.cuh"

namespace skiplayers::cuda {

// ---- block-wide exclusive prefix sum of one flag per thread ----------------------------------

// Returns the number of set flags of the threads before this one in the block; *total gets the
// block's count. `scratch` is shared memory for 32 ints. Contains barriers: call from every thread.
template <int kThreads>
__device__ __forceinline__ int32_t block_exclusive_count(bool flag, int32_t* scratch, int32_t* total) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most 1024 threads");
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const unsigned ballot = __ballot_sync(kFullMask, flag);
  const int32_t in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) scratch[warp] = __popc(ballot);
  __syncthreads();
  if (warp == 0) {  // exclusive scan of the warp counts
    const int32_t c = lane < kWarps ? scratch[lane] : 0;
    int32_t inclusive = c;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int32_t o = __shfl_up_sync(kFullMask, inclusive, off);
      if (lane >= off) inclusive += o;
    }
    if (lane < kWarps) scratch[lane] = inclusive - c;
    if (lane == kWarps - 1) scratch[kWarps] = inclusive;  // kWarps <= 32, scratch holds 33
  }
  __syncthreads();
  const int32_t result = scratch[warp] + in_warp;
  *total = scratch[kWarps];
  __syncthreads();  // scratch may be reused right away
  return result;
}

// ---- compact_rows: map ----------------------------------------------------------------------

constexpr int kScanThreads = 1024;

// One block. prefix[i] = kept rows before row i (i <= n); new_cu[b] = prefix[cu[b]].
// status[0] = 1 if cu_seqlens is not a valid [B + 1] offset vector for n rows (checked on the host
// after the one synchronisation compact_rows needs anyway, for its output size prefix[n]).
__global__ void __launch_bounds__(kScanThreads)
    compact_rows_scan_kernel(const bool* keep, int32_t n, const int32_t* cu, int32_t batch, int32_t* prefix,
                             int32_t* new_cu, int32_t* status) {
  __shared__ int32_t scratch[33];
  if (threadIdx.x == 0) status[0] = 0;  // set to 1 below (after a barrier) if cu_seqlens is invalid
  int32_t carry = 0;
  for (int32_t base = 0; base < n; base += kScanThreads) {
    const int32_t i = base + threadIdx.x;
    int32_t total;
    const int32_t before = block_exclusive_count<kScanThreads>(i < n && keep[i], scratch, &total);
    if (i < n) prefix[i] = carry + before;
    carry += total;
  }
  if (threadIdx.x == 0) prefix[n] = carry;
  __syncthreads();  // prefix[] written by this block is visible to all its threads
  for (int32_t b = threadIdx.x; b <= batch; b += kScanThreads) {
    const int32_t c = cu[b];
    const bool ok = c >= 0 && c <= n && (b > 0 ? cu[b - 1] <= c : c == 0) && (b < batch || c == n);
    new_cu[b] = ok ? prefix[c] : 0;
    if (!ok) status[0] = 1;
  }
}

struct CompactRowsMap {
  const bool* keep;
  const int32_t* prefix;
  __device__ int64_t operator()(int64_t row) const { return keep[row] ? prefix[row] : -1; }
};

// ---- cache_append: map ----------------------------------------------------------------------

// New row i of sequence b goes to slot cache_seqlens[b] + (i - cu[b]) of that sequence.
struct CacheAppendMap {
  const int32_t* cu_seqlens;     // [B + 1] over the new rows
  const int32_t* cache_seqlens;  // [B]
  int32_t batch;
  int32_t capacity;
  int64_t rows;
  __device__ int64_t operator()(int64_t row) const {
    SKIPLAYERS_DEVICE_CHECK(cu_seqlens[0] == 0 && cu_seqlens[batch] == rows,
                            "skiplayers::cache_append: cu_seqlens must start at 0 and end at the number of new rows");
    const int32_t b = sequence_of_row(cu_seqlens, batch, row);
    SKIPLAYERS_DEVICE_CHECK(cu_seqlens[b] <= row && row < cu_seqlens[b + 1],
                            "skiplayers::cache_append: cu_seqlens must be non-decreasing");
    const int64_t length = cache_seqlens[b];
    const int64_t slot = length + (row - cu_seqlens[b]);
    SKIPLAYERS_DEVICE_CHECK(length >= 0 && slot < capacity,
                            "skiplayers::cache_append: cache_seqlens[b] + new rows exceeds the cache capacity");
    return static_cast<int64_t>(b) * capacity + slot;
  }
};

// ---- cache_compact: map ---------------------------------------------------------------------

constexpr int kCompactThreads = 256;

// One block per sequence. slot_map[b, s] = destination slot b * new_capacity + (kept slots before
// s) if s < cache_seqlens[b] and keep[b, s], else -1; new_lens[b] = kept count. error[b]: 0 ok,
// 1 cache_seqlens[b] outside [0, capacity], 2 more kept slots than new_capacity (then nothing past
// new_capacity is mapped). With `trap`, an error stops the kernel (used under CUDA-graph capture,
// where the host cannot read `error`).
__global__ void __launch_bounds__(kCompactThreads)
    cache_compact_scan_kernel(const bool* keep, const int32_t* cache_seqlens, int32_t capacity, int32_t new_capacity,
                              int64_t* slot_map, int32_t* new_lens, int32_t* error, bool trap) {
  __shared__ int32_t scratch[33];
  const int32_t b = blockIdx.x;
  const int32_t length = cache_seqlens[b];
  const bool bad_length = length < 0 || length > capacity;
  const int32_t n = bad_length ? 0 : length;
  const int64_t row = static_cast<int64_t>(b) * capacity;
  int32_t carry = 0;
  for (int32_t base = 0; base < capacity; base += kCompactThreads) {
    const int32_t s = base + threadIdx.x;
    const bool kept = s < n && keep[row + s];
    int32_t total;
    const int32_t dst = carry + block_exclusive_count<kCompactThreads>(kept, scratch, &total);
    if (s < capacity) slot_map[row + s] = kept && dst < new_capacity ? b * static_cast<int64_t>(new_capacity) + dst : -1;
    carry += total;
  }
  if (threadIdx.x == 0) {
    const int32_t code = bad_length ? 1 : (carry > new_capacity ? 2 : 0);
    new_lens[b] = carry;
    error[b] = code;
    if (trap) {
      SKIPLAYERS_DEVICE_CHECK(code != 1, "skiplayers::cache_compact: cache_seqlens[b] is outside [0, capacity]");
      SKIPLAYERS_DEVICE_CHECK(code != 2, "skiplayers::cache_compact: a sequence keeps more slots than the new capacity");
    }
  }
}

struct CacheCompactMap {
  const int64_t* slot_map;
  __device__ int64_t operator()(int64_t row) const { return slot_map[row]; }
};

// ---- the generic row copy -------------------------------------------------------------------

// One tensor moved row by row: row r (heads x head_bytes, strided) goes to row map(r) of dst.
struct CopyPlane {
  const char* src;
  char* dst;
  int64_t src_row_stride, src_head_stride;  // bytes
  int64_t dst_row_stride, dst_head_stride;  // bytes
  int32_t heads;
  int32_t head_bytes;
  int32_t width;  // bytes per access: 16, 8, 4, 2 or 1; divides head_bytes, strides and addresses
};

constexpr int kMaxPlanes = 4;
constexpr int kCopyThreads = 256;

struct CopyPlanes {
  CopyPlane plane[kMaxPlanes];
  int32_t count;
};

template <int W>
__device__ __forceinline__ void copy_units(const CopyPlane& c, int64_t src_row, int64_t dst_row, int lane) {
  using Unit = typename std::conditional<W == 16, uint4,
               typename std::conditional<W == 8, uint2,
               typename std::conditional<W == 4, uint32_t,
               typename std::conditional<W == 2, uint16_t, uint8_t>::type>::type>::type>::type;
  const int32_t per_head = c.head_bytes / W;
  const int32_t units = c.heads * per_head;
  const char* src = c.src + src_row * c.src_row_stride;
  char* dst = c.dst + dst_row * c.dst_row_stride;
  for (int32_t u = lane; u < units; u += 32) {
    const int32_t h = u / per_head;
    const int32_t x = (u - h * per_head) * W;
    *reinterpret_cast<Unit*>(dst + h * c.dst_head_stride + x) =
        *reinterpret_cast<const Unit*>(src + h * c.src_head_stride + x);
  }
}

// A warp per source row (grid-stride); rows the map sends to -1 are dropped.
template <typename Map>
__global__ void __launch_bounds__(kCopyThreads) copy_rows_kernel(const CopyPlanes planes, int64_t rows, const Map map) {
  constexpr int kWarps = kCopyThreads / 32;
  const int lane = threadIdx.x & 31;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t dst = map(row);
    if (dst < 0) continue;
    for (int pl = 0; pl < planes.count; ++pl) {
      const CopyPlane& c = planes.plane[pl];
      switch (c.width) {
        case 16: copy_units<16>(c, row, dst, lane); break;
        case 8: copy_units<8>(c, row, dst, lane); break;
        case 4: copy_units<4>(c, row, dst, lane); break;
        case 2: copy_units<2>(c, row, dst, lane); break;
        default: copy_units<1>(c, row, dst, lane); break;
      }
    }
  }
}

}  // namespace skiplayers::cuda
