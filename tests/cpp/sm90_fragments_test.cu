// Host checks of the register fragments of the sm_90a prefill (csrc/cuda/sm90_layouts.cuh), which the
// kernel's softmax and its P = S reuse depend on. Compiled by nvcc as host code; no GPU needed.
//
// For every consumer thread (0..255), with CuTe's own thread-value layouts of the tiled wgmma MMAs:
//   * S = Q K^T accumulator element i of the thread sits at tile row R(t) + 8 * ((i >> 1) & 1) and key
//     column 8 * (i >> 2) + 2 * (t % 4) + (i & 1), where R(t) = 64 * warpgroup + 16 * warp + (t % 32) / 4:
//     the two rows per thread the kernel assumes, each row spread over the 4 lanes of a quad;
//   * element i of the thread's A operand of O += P V (its own compact fragment, flat index) is the same
//     (row, key) as accumulator element i of S: P is S converted element by element;
//   * the O accumulator has the same rows per element parity as S (the epilogue's row choice).
// The shared-memory tiles are checked against the TMA boxes as the kernel's static_asserts do.
#include "../../csrc/cuda/sm90_layouts.cuh"

#include <cstdio>

using namespace skiplayers::cuda::sm90;

namespace {

int failures = 0;

void fail(const char* what, int t, int i, int got_r, int got_c, int want_r, int want_c) {
  if (failures++ < 20)
    std::fprintf(stderr, "FAILED %s: thread %d element %d at (%d, %d), expected (%d, %d)\n", what, t, i, got_r, got_c,
                 want_r, want_c);
}

template <typename Elem, int D>
void check() {
  using L = Sm90Layouts<Elem, D>;
  static_assert(layout_matches_tma_boxes<typename L::SmemLayoutKV, kKeys, D, L::kStages>());
  static_assert(q_layout_matches_rows<typename L::SmemLayoutQ, kRows, D>());
  typename L::MmaS mma_s;
  typename L::MmaO mma_o;
  for (int t = 0; t < kConsumerThreads; ++t) {
    auto thr_s = mma_s.get_thread_slice(t);
    auto thr_o = mma_o.get_thread_slice(t);
    Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kKeys>>{}));
    Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<D>>{}));
    Tensor tOaP = thr_o.partition_A(make_identity_tensor(Shape<Int<kRows>, Int<kKeys>>{}));
    static_assert(size(tScS) == kKeys / 2 && size(tOaP) == kKeys / 2 && size(tOcO) == D / 2);
    const int lane = t % 32, base = 64 * (t / 128) + 16 * ((t / 32) % 4) + lane / 4;
    for (int i = 0; i < size(tScS); ++i) {
      const int r = get<0>(tScS(i)), c = get<1>(tScS(i));
      const int want_r = base + 8 * ((i >> 1) & 1), want_c = 8 * (i >> 2) + 2 * (lane % 4) + (i & 1);
      if (r != want_r || c != want_c) fail("S accumulator", t, i, r, c, want_r, want_c);
      const int pr = get<0>(tOaP(i)), pc = get<1>(tOaP(i));
      if (pr != r || pc != c) fail("P operand vs S accumulator", t, i, pr, pc, r, c);
    }
    for (int i = 0; i < size(tOcO); ++i) {
      const int r = get<0>(tOcO(i)), c = get<1>(tOcO(i));
      const int want_r = base + 8 * ((i >> 1) & 1), want_c = 8 * (i >> 2) + 2 * (lane % 4) + (i & 1);
      if (r != want_r || c != want_c) fail("O accumulator", t, i, r, c, want_r, want_c);
    }
  }
}

}  // namespace

int main() {
  check<cute::half_t, 64>();
  check<cute::half_t, 128>();
  check<cute::bfloat16_t, 64>();
  check<cute::bfloat16_t, 128>();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::puts("sm90 fragments: all checks passed");
  return 0;
}
