// Torch-free, CUDA-free index math of the sm_90a prefill (prefill_sm90_kernel.cuh), host-tested by
// tests/cpp/sm90_plan_test.cpp (tests/test_sm90_plan.py):
//
//   * key block slots: the summary (visibility.h BlockSummary) of key block j of sequence s lives at
//     slot key_block_base(cu_seqlens_k[s], s) + j of one workspace array, sized from host-known
//     numbers only (no synchronisation);
//   * the TMA descriptor parameters of the packed K / V rows [total_k, kv_heads, D] (the values handed
//     to cuTensorMapEncodeTiled), with the hardware's constraints checked.
#pragma once

#include <cstdint>

#include "skiplayers/ragged.h"

namespace skiplayers::sm90 {

// ---- key block slots ------------------------------------------------------------------------------

// First slot of sequence `seq`'s key blocks (blocks of `block` keys), when it starts at packed key
// row `key_begin`: floor((key_begin + (block - 1) * seq) / block). Sequence s has
// ceil(keys_s / block) blocks and base(s + 1) - base(s) >= floor((keys_s + block - 1) / block), so
// the ranges of different sequences never overlap.
SKIPLAYERS_HD int64_t key_block_base(int64_t key_begin, int64_t seq, int64_t block) {
  return (key_begin + (block - 1) * seq) / block;
}

// Slots for every sequence of a batch (an upper bound of the last slot used + 1, from host-known
// numbers): floor((total_k + (block - 1) * batch) / block), at least 1 (an allocation of 0 bytes is
// avoided).
SKIPLAYERS_HD int64_t key_block_slots(int64_t total_k, int64_t batch, int64_t block) {
  const int64_t n = tiles_upper_bound(total_k, batch, 1, block);
  return n > 0 ? n : 1;
}

// The (sequence, block) that owns slot `slot`, or seq = -1 when no block does (a gap between
// sequences, or past the last). cu_seqlens: [batch + 1], non-decreasing from 0.
struct KeyBlock {
  int32_t seq;
  int64_t block;  // index of the block within its sequence
};

SKIPLAYERS_HD KeyBlock key_block_of_slot(const int32_t* cu_seqlens, int32_t batch, int64_t block, int64_t slot) {
  // The largest s with base(s) <= slot: base is non-decreasing in s.
  int32_t lo = 0, hi = batch;  // invariant: base(lo) <= slot (base(0) = 0), answer < hi
  while (hi - lo > 1) {
    const int32_t mid = lo + (hi - lo) / 2;  // no int32 overflow past 2^30 sequences
    if (key_block_base(cu_seqlens[mid], mid, block) <= slot) lo = mid; else hi = mid;
  }
  KeyBlock kb{-1, 0};
  if (batch <= 0) return kb;
  const int64_t j = slot - key_block_base(cu_seqlens[lo], lo, block);
  const int64_t keys = static_cast<int64_t>(cu_seqlens[lo + 1]) - cu_seqlens[lo];
  if (j >= 0 && j * block < keys) {
    kb.seq = lo;
    kb.block = j;
  }
  return kb;
}

// ---- TMA descriptor of the K / V rows ----------------------------------------------------------------

// The packed rows [total_k, kv_heads, D] (dense last dim, strides in elements) as a 3-D TMA tensor,
// innermost dimension first: (D, kv_heads, total_k). A box is kBoxCols = 128 bytes of one row's head
// dims (the widest box SWIZZLE_128B takes) x 1 head x `box_rows` keys; a tile of D columns is D /
// box_cols boxes, landing in shared memory one after another (prefill_sm90_kernel.cuh's layout).
struct TmaRowsParams {
  uint64_t dims[3];     // elements: D, kv_heads, total_k
  uint64_t strides[2];  // bytes of dims 1 and 2 (dim 0 is dense)
  uint32_t box[3];      // elements: box_cols, 1, box_rows
  const char* error;    // nullptr when the view is valid for TMA; else why not
};

// TMA limits (CUDA driver API, cuTensorMapEncodeTiled): dims in [1, 2^32], strides multiples of 16
// bytes below 2^40, box dims in [1, 256], the base address 16-byte aligned, and with SWIZZLE_128B a box
// row of at most 128 bytes.
SKIPLAYERS_HD TmaRowsParams tma_rows_params(uint64_t address, int64_t total_k, int64_t kv_heads, int64_t head_dim,
                                            int64_t token_stride, int64_t head_stride, int64_t elem_bytes,
                                            int64_t box_rows) {
  TmaRowsParams t{};
  t.error = nullptr;
  const int64_t box_cols = 128 / elem_bytes;
  // A dim of size 1 is never stepped over, so its stride is free: give it a valid value (the launcher's
  // alignment guarantee covers only dims of size > 1).
  const int64_t row_bytes = head_dim * elem_bytes;
  const int64_t head_bytes = kv_heads > 1 ? head_stride * elem_bytes : row_bytes;
  const int64_t token_bytes = total_k > 1 ? token_stride * elem_bytes : row_bytes * kv_heads;
  t.dims[0] = static_cast<uint64_t>(head_dim);
  t.dims[1] = static_cast<uint64_t>(kv_heads);
  t.dims[2] = static_cast<uint64_t>(total_k);
  t.strides[0] = static_cast<uint64_t>(head_bytes);
  t.strides[1] = static_cast<uint64_t>(token_bytes);
  t.box[0] = static_cast<uint32_t>(box_cols);
  t.box[1] = 1;
  t.box[2] = static_cast<uint32_t>(box_rows);
  constexpr int64_t kMaxDim = int64_t{1} << 32, kMaxStride = int64_t{1} << 40;
  if (elem_bytes != 2) t.error = "elements must be 2 bytes (fp16 / bf16)";
  else if (head_dim <= 0 || head_dim % box_cols != 0) t.error = "head_dim must be a multiple of 64";
  else if (total_k < 1 || kv_heads < 1 || total_k > kMaxDim || kv_heads > kMaxDim) t.error = "total_k and kv_heads must be in [1, 2^32]";
  else if (box_rows < 1 || box_rows > 256) t.error = "a box holds 1 to 256 rows";
  else if (address % 16 != 0) t.error = "the base address must be 16-byte aligned";
  else if (head_bytes <= 0 || token_bytes <= 0 || head_bytes % 16 != 0 || token_bytes % 16 != 0)
    t.error = "the head and token strides must be positive multiples of 16 bytes";
  else if (head_bytes >= kMaxStride || token_bytes >= kMaxStride) t.error = "strides must be below 2^40 bytes";
  return t;
}

}  // namespace skiplayers::sm90
