// Kernels that move rows: compaction of a packed ragged batch (compact_rows), the paged cache write
// at per-sequence offsets (cache_append) and per-sequence compaction of a paged cache in place
// (cache_compact).
//
// compact_rows and cache_append are (1) a map from source row to destination row (a block-wide
// prefix sum where a mask decides; the block table for paged slots) and (2) one generic copy kernel
// that moves every mapped row (a warp per row, the widest aligned vector the launcher found) for up
// to four "planes" at once (K, V, pos, tag). cache_compact moves slots within the pools themselves,
// so it is one kernel that orders its loads and stores (see cache_compact_kernel).
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

// New row i of sequence b goes to slot cache_seqlens[b] + (i - cu[b]) of that sequence, which is
// flat slot paged_slot(block_table[b], page_size, slot) of the pools (ragged.h).
struct CacheAppendMap {
  const int32_t* cu_seqlens;     // [B + 1] over the new rows
  const int32_t* cache_seqlens;  // [B]
  const int32_t* block_table;    // [B, max_pages], contiguous
  int32_t batch;
  int32_t max_pages;
  int32_t page_size;
  int32_t pool_slots;  // num_pages * page_size
  int64_t rows;
  __device__ int64_t operator()(int64_t row) const {
    SKIPLAYERS_DEVICE_CHECK(cu_seqlens[0] == 0 && cu_seqlens[batch] == rows,
                            "skiplayers::cache_append: cu_seqlens must start at 0 and end at the number of new rows");
    const int32_t b = sequence_of_row(cu_seqlens, batch, row);
    SKIPLAYERS_DEVICE_CHECK(cu_seqlens[b] <= row && row < cu_seqlens[b + 1],
                            "skiplayers::cache_append: cu_seqlens must be non-decreasing");
    const int64_t length = cache_seqlens[b];
    const int64_t slot = length + (row - cu_seqlens[b]);
    SKIPLAYERS_DEVICE_CHECK(length >= 0 && slot < static_cast<int64_t>(max_pages) * page_size,
                            "skiplayers::cache_append: cache_seqlens[b] + new rows exceeds the slots of the block table "
                            "(max_pages * page_size)");
    const int64_t flat = paged_slot(block_table + static_cast<int64_t>(b) * max_pages, page_size, slot);
    // page = flat / page_size is in [0, num_pages) exactly when flat is in [0, pool_slots).
    SKIPLAYERS_DEVICE_CHECK(flat >= 0 && flat < pool_slots,
                            "skiplayers::cache_append: a block_table entry of a slot it writes is not a page of the pool");
    return flat;
  }
};

// ---- cache_compact: in place ----------------------------------------------------------------

constexpr int kCompactThreads = 256;
constexpr int kCompactUnits = 4;  // 16-byte registers a thread holds per pass

struct CacheCompactParams {
  char* k_cache;  // pools as flat slots (contiguous): slot i at i * row_bytes
  char* v_cache;
  int32_t* pos_cache;  // [num_pages * page_size]
  int32_t* tag_cache;
  int32_t row_bytes;  // bytes of one K (or V) slot: kv_heads * head_dim * element size
  int32_t width;      // bytes per K/V access: 16, 8, 4, 2 or 1; divides row_bytes and both pool addresses
  const int32_t* block_table;    // [B, max_pages], contiguous
  const int32_t* cache_seqlens;  // [B]
  const bool* keep;              // [B, max_pages * page_size], contiguous
  int32_t max_pages;
  int32_t page_size;
  int32_t pool_slots;  // num_pages * page_size
  int32_t* new_lens;   // [B], output
};

// `width` bytes at `src` into the low bytes of a 16-byte register, and back.
__device__ __forceinline__ uint4 load_bytes(const char* src, int width) {
  uint4 r = make_uint4(0, 0, 0, 0);
  switch (width) {
    case 16: r = *reinterpret_cast<const uint4*>(src); break;
    case 8: {
      const uint2 x = *reinterpret_cast<const uint2*>(src);
      r.x = x.x;
      r.y = x.y;
      break;
    }
    case 4: r.x = *reinterpret_cast<const uint32_t*>(src); break;
    case 2: r.x = *reinterpret_cast<const uint16_t*>(src); break;
    default: r.x = *reinterpret_cast<const uint8_t*>(src); break;
  }
  return r;
}

__device__ __forceinline__ void store_bytes(char* dst, int width, const uint4& r) {
  switch (width) {
    case 16: *reinterpret_cast<uint4*>(dst) = r; break;
    case 8: *reinterpret_cast<uint2*>(dst) = make_uint2(r.x, r.y); break;
    case 4: *reinterpret_cast<uint32_t*>(dst) = r.x; break;
    case 2: *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(r.x); break;
    default: *reinterpret_cast<uint8_t*>(dst) = static_cast<uint8_t>(r.x); break;
  }
}

// Unit `unit` of a move (its slot's K units, its V units, then pos and tag): its address in the
// pools at flat slot `slot`, and its width.
__device__ __forceinline__ char* compact_unit(const CacheCompactParams& p, int32_t slot, int32_t unit,
                                              int32_t kv_units, int* width) {
  if (unit < 2 * kv_units) {
    *width = p.width;
    char* pool = unit < kv_units ? p.k_cache : p.v_cache;
    const int32_t within = unit < kv_units ? unit : unit - kv_units;
    return pool + static_cast<int64_t>(slot) * p.row_bytes + static_cast<int64_t>(within) * p.width;
  }
  *width = 4;
  return reinterpret_cast<char*>((unit == 2 * kv_units ? p.pos_cache : p.tag_cache) + slot);
}

// The moves of a window (flat slot src[i] -> dst[i], i < count, in source-slot order), in passes:
// a pass holds whole moves (or, when one move's bytes exceed a pass, part of a single move); all its
// loads, into registers, come before a barrier and all its stores after it, and a barrier ends it.
// Contains barriers: call from every thread with the same count.
__device__ __forceinline__ void compact_moves(const CacheCompactParams& p, const int32_t* src, const int32_t* dst,
                                              int32_t count) {
  constexpr int32_t kPassUnits = kCompactThreads * kCompactUnits;
  const int32_t kv_units = p.row_bytes / p.width;
  const int32_t per_move = 2 * kv_units + 2;  // K, V, pos, tag
  const int32_t moves_per_pass = per_move <= kPassUnits ? kPassUnits / per_move : 1;
  const int32_t parts = per_move <= kPassUnits ? 1 : static_cast<int32_t>(ceil_div(per_move, kPassUnits));
  for (int32_t first = 0; first < count; first += moves_per_pass) {
    const int32_t last = min(first + moves_per_pass, count);
    for (int32_t part = 0; part < parts; ++part) {
      const int32_t begin = first * per_move + part * kPassUnits;
      const int32_t end = min(begin + kPassUnits, last * per_move);
      uint4 held[kCompactUnits];
#pragma unroll
      for (int i = 0; i < kCompactUnits; ++i) {
        const int32_t u = begin + i * kCompactThreads + threadIdx.x;
        if (u < end) {
          const int32_t move = u / per_move;
          int width;
          const char* a = compact_unit(p, src[move], u - move * per_move, kv_units, &width);
          held[i] = load_bytes(a, width);
        }
      }
      __syncthreads();  // every load of the pass before any of its stores
#pragma unroll
      for (int i = 0; i < kCompactUnits; ++i) {
        const int32_t u = begin + i * kCompactThreads + threadIdx.x;
        if (u < end) {
          const int32_t move = u / per_move;
          int width;
          char* a = compact_unit(p, dst[move], u - move * per_move, kv_units, &width);
          store_bytes(a, width, held[i]);
        }
      }
      __syncthreads();  // every store of the pass before the next pass's loads
    }
  }
}

// One block per sequence: the slots s < cache_seqlens[b] with keep[b, s] move to the front of the
// sequence's slots, order kept, in place; new_lens[b] = their count.
//
// Why in place is race-free: kept slot s goes to slot d(s) = (kept slots before s) <= s, and d
// grows with s. The block walks the sequence's slots in windows of kCompactThreads, in order; a
// window's moves run in passes, in source order (compact_moves), each pass loading everything it
// moves before any thread stores. A store of a window's pass goes to d(s) <= s < the end of the
// window; the slots it may overwrite are sources of this pass (already loaded: the barrier), of
// earlier passes or windows (already moved), or not kept: never a source still to be read. Slots
// with d(s) == s do not move. Global memory written before a __syncthreads is visible to the
// block's threads after it (plain loads here; never the read-only cache path). Sequences own
// disjoint pages (a precondition of the writing ops), so blocks do not interact.
//
// Device checks: cache_seqlens[b] in [0, max_pages * page_size], and the block table entry of every
// slot in use a page of the pool.
__global__ void __launch_bounds__(kCompactThreads) cache_compact_kernel(const CacheCompactParams p) {
  __shared__ int32_t scratch[33];
  __shared__ int32_t move_src[kCompactThreads];  // flat slots of the window's moves, in source order
  __shared__ int32_t move_dst[kCompactThreads];
  const int32_t b = blockIdx.x;
  const int32_t capacity = p.max_pages * p.page_size;
  const int32_t length = p.cache_seqlens[b];
  const bool length_ok = length >= 0 && length <= capacity;
  SKIPLAYERS_DEVICE_CHECK(length_ok, "skiplayers::cache_compact: cache_seqlens[b] is outside [0, max_pages * page_size]");
  const int32_t n = length_ok ? length : 0;
  const int32_t* table_row = p.block_table + static_cast<int64_t>(b) * p.max_pages;
  const bool* keep = p.keep + static_cast<int64_t>(b) * capacity;

  int32_t kept_before = 0;  // kept slots of the windows already walked
  for (int32_t base = 0; base < n; base += kCompactThreads) {
    const int32_t s = base + threadIdx.x;
    const bool in_use = s < n;
    const bool kept = in_use && keep[s];
    int32_t kept_in_window;
    const int32_t d = kept_before + block_exclusive_count<kCompactThreads>(kept, scratch, &kept_in_window);
    kept_before += kept_in_window;
    int64_t from = 0, to = 0;
    if (in_use) {
      from = paged_slot(table_row, p.page_size, s);
      // page = from / page_size is in [0, num_pages) exactly when from is in [0, pool_slots).
      SKIPLAYERS_DEVICE_CHECK(from >= 0 && from < p.pool_slots,
                              "skiplayers::cache_compact: a block_table entry of a slot in use is not a page of the pool");
    }
    if (kept && d != s) to = paged_slot(table_row, p.page_size, d);  // d < s: a slot in use, checked as such
    const bool moves = kept && d != s && from >= 0 && from < p.pool_slots && to >= 0 && to < p.pool_slots;
    int32_t move_count;
    const int32_t m = block_exclusive_count<kCompactThreads>(moves, scratch, &move_count);
    if (moves) {
      move_src[m] = static_cast<int32_t>(from);
      move_dst[m] = static_cast<int32_t>(to);
    }
    __syncthreads();  // the move list is complete
    compact_moves(p, move_src, move_dst, move_count);  // ends with a barrier when it moves anything
    __syncthreads();  // the move list is read before the next window rewrites it
  }
  if (threadIdx.x == 0) p.new_lens[b] = kept_before;
}

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
