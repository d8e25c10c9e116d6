// The CuTe layouts of the sm_90a prefill (prefill_sm90_kernel.cuh): shared-memory tiles and tiled
// wgmma MMAs, with the facts the kernel relies on checked at compile time. Host-compilable (CuTe
// only, no torch): tests/cpp/sm90_fragments_test.cu checks the register fragments on the host.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

#include <type_traits>

namespace skiplayers::cuda::sm90 {

using namespace cute;

template <typename T>
using CuteElem = std::conditional_t<std::is_same_v<T, __half>, cute::half_t, cute::bfloat16_t>;

constexpr int kRows = 128;  // query rows per CTA
constexpr int kKeys = 128;  // keys per block (one stage)
constexpr int kConsumerWarpgroups = 2;
constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
constexpr int kBoxCols = 64;  // head dims per TMA box: 128 bytes (SWIZZLE_128B)

template <typename ElemT, int D>
struct Sm90Layouts {
  static_assert(D == 64 || D == 128, "the sm_90a prefill takes head dims 64 and 128");
  using Elem = ElemT;
  static_assert(sizeof(Elem) == 2);
  // Two stages of 64 KiB at D = 128 (+ Q 32 KiB); three of 32 KiB at D = 64 (+ Q 16 KiB).
  static constexpr int kStages = D == 64 ? 3 : 2;

  // Q: (kRows, D), K and V: (kKeys, D, stage), all K-major (head dim contiguous) with the 128-byte
  // swizzle atom (8 rows x 64 elements). tile_to_shape stacks the atoms down the rows first, so each
  // 64-column slab of a tile is kRows (kKeys) x 128 bytes contiguous: exactly one TMA box.
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<kRows>, Int<D>>{}));
  using SmemLayoutKV =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<kKeys>, Int<D>, Int<kStages>>{}));
  // V^T (D, kKeys, stage): the same bytes, indexed (d, key): the B operand of O += P V, MN-major.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<D>, Int<kKeys>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  // S = Q K^T: one 64 x kKeys x 16 wgmma atom per warpgroup, the two warpgroups stacked along M.
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kKeys>, Int<D>>, GMMA::Major::K, GMMA::Major::K>(),
      Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>{}));
  // O += P V: P from registers (A, K-major), V^T from shared memory (B, MN-major).
  using MmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, Int<D>, Int<kKeys>>, GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>{}));

  static_assert(cosize_v<SmemLayoutQ> == kRows * D);
  static_assert(cosize_v<SmemLayoutKV> == kStages * kKeys * D);
  static_assert(size(MmaS{}) == kConsumerThreads && size(MmaO{}) == kConsumerThreads);
  static_assert(D % kBoxCols == 0 && kBoxCols * sizeof(Elem) == 128);
};

// Layout checks (compile time). A swizzled shared-memory layout of CuTe is Swizzle o ptr-flag o L: the
// swizzle acts on the byte address (where the tensor's pointer is), L maps coordinates to element
// offsets. TMA's SWIZZLE_128B XORs bits 4-6 of the byte address (16-byte chunk) with bits 7-9 (row
// within the 1024-byte period): that is Swizzle<3, 4, 3> on bytes. So a tile matches the TMA boxes when
// its swizzle is Swizzle<3, 4, 3> and L places (row r, column slab * 64 + c, stage s) at
//   s * Rows * Cols + slab * Rows * 64 + r * 64 + c     (box = 64 columns x Rows rows, 128-byte rows).
template <class Layout>
constexpr bool has_sw128_swizzle() {
  return std::is_same_v<std::remove_cv_t<decltype(get_swizzle_portion(Layout{}))>, Swizzle<3, 4, 3>>;
}

template <class Layout, int Rows, int Cols, int Stages>
constexpr bool layout_matches_tma_boxes() {
  if (!has_sw128_swizzle<Layout>()) return false;
  constexpr auto inner = get_nonswizzle_portion(Layout{});
  for (int s = 0; s < Stages; ++s)
    for (int slab = 0; slab < Cols / kBoxCols; ++slab)
      for (int r = 0; r < Rows; r += (r < 16 ? 1 : 37))
        for (int c = 0; c < kBoxCols; c += 3) {
          const int got = inner(make_coord(r, slab * kBoxCols + c, s));
          if (got != s * Rows * Cols + slab * Rows * kBoxCols + r * kBoxCols + c) return false;
        }
  return true;
}

// The Q tile: the same arrangement (one stage), which also keeps every 16-byte chunk (8 elements
// from a multiple of 8) contiguous, so the Q loads store it as one vector.
template <class Layout, int Rows, int Cols>
constexpr bool q_layout_matches_rows() {
  if (!has_sw128_swizzle<Layout>()) return false;
  constexpr auto inner = get_nonswizzle_portion(Layout{});
  for (int slab = 0; slab < Cols / kBoxCols; ++slab)
    for (int r = 0; r < Rows; r += (r < 16 ? 1 : 29))
      for (int c = 0; c < kBoxCols; ++c)
        if (inner(make_coord(r, slab * kBoxCols + c)) != slab * Rows * kBoxCols + r * kBoxCols + c) return false;
  return true;
}

}  // namespace skiplayers::cuda::sm90
