// Host checks of csrc/cuda/sm90_plan.h (the sm_90a prefill's key block slots and TMA descriptor
// parameters). No torch, no GPU, no CUDA headers. Exits non-zero with a message on the first failure.
#include "../../csrc/cuda/sm90_plan.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const char* what, long long a = 0, long long b = 0) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s (%lld, %lld)\n", what, a, b);
    ++failures;
  }
}

// Every (sequence, block) gets its own slot below key_block_slots, and key_block_of_slot inverts the map
// (unowned slots answer seq = -1).
void check_slots(const std::vector<int32_t>& lengths, int64_t block) {
  std::vector<int32_t> cu{0};
  for (int32_t n : lengths) cu.push_back(cu.back() + n);
  const int32_t batch = static_cast<int32_t>(lengths.size());
  const int64_t total = cu.back();
  const int64_t slots = skiplayers::sm90::key_block_slots(total, batch, block);
  check(slots >= 1, "at least one slot", slots);
  std::set<int64_t> used;
  for (int32_t s = 0; s < batch; ++s) {
    const int64_t base = skiplayers::sm90::key_block_base(cu[s], s, block);
    const int64_t blocks = skiplayers::ceil_div(lengths[s], block);
    for (int64_t j = 0; j < blocks; ++j) {
      const int64_t slot = base + j;
      check(slot >= 0 && slot < slots, "slot within key_block_slots", slot, slots);
      check(used.insert(slot).second, "slots of two blocks collide", slot, s);
      const skiplayers::sm90::KeyBlock kb = skiplayers::sm90::key_block_of_slot(cu.data(), batch, block, slot);
      check(kb.seq == s && kb.block == j, "key_block_of_slot inverts key_block_base", kb.seq, kb.block);
    }
  }
  for (int64_t slot = 0; slot < slots; ++slot) {
    if (used.count(slot)) continue;
    const skiplayers::sm90::KeyBlock kb = skiplayers::sm90::key_block_of_slot(cu.data(), batch, block, slot);
    check(kb.seq == -1, "an unowned slot maps to no block", slot, kb.seq);
  }
}

void check_tma() {
  using skiplayers::sm90::tma_rows_params;
  // [1000, 8, 128] contiguous fp16 K: dims (128, 8, 1000), strides 256 B (head) and 2048 B (token).
  auto t = tma_rows_params(0x1000, 1000, 8, 128, 8 * 128, 128, 2, 128);
  check(t.error == nullptr, "contiguous K is valid");
  check(t.dims[0] == 128 && t.dims[1] == 8 && t.dims[2] == 1000, "dims innermost first");
  check(t.strides[0] == 256 && t.strides[1] == 2048, "byte strides", (long long)t.strides[0], (long long)t.strides[1]);
  check(t.box[0] == 64 && t.box[1] == 1 && t.box[2] == 128, "box: 128 bytes x 1 head x 128 rows");
  // K as a view of a fused QKV projection: token stride (32 + 2 * 8) * 64 elements, head stride 64.
  t = tma_rows_params(0x2000, 77, 8, 64, 48 * 64, 64, 2, 128);
  check(t.error == nullptr && t.strides[0] == 128 && t.strides[1] == 48 * 64 * 2, "strided view");
  // One KV head: its stride is never used and may be anything (even unaligned).
  t = tma_rows_params(0x2000, 77, 1, 64, 64, 3, 2, 128);
  check(t.error == nullptr && t.strides[0] == 128, "a single head's stride is free");
  // One key row: the token stride is free.
  t = tma_rows_params(0x2000, 1, 2, 64, 5, 64, 2, 128);
  check(t.error == nullptr && t.strides[1] == 2 * 128, "a single row's stride is free");
  // Refusals.
  check(tma_rows_params(0x2008, 10, 2, 64, 128, 64, 2, 128).error != nullptr, "base address not 16-byte aligned");
  check(tma_rows_params(0x2000, 10, 2, 64, 128, 68, 2, 128).error != nullptr, "head stride of 136 bytes");
  check(tma_rows_params(0x2000, 10, 2, 64, 132, 64, 2, 128).error != nullptr, "token stride of 264 bytes");
  check(tma_rows_params(0x2000, 10, 2, 96, 192, 96, 2, 128).error != nullptr, "head dim 96 (not a multiple of 64)");
  check(tma_rows_params(0x2000, 10, 2, 64, 128, 64, 4, 128).error != nullptr, "4-byte elements");
  check(tma_rows_params(0x2000, 0, 2, 64, 128, 64, 2, 128).error != nullptr, "no rows");
  check(tma_rows_params(0x2000, 10, 2, 64, 128, 64, 2, 257).error != nullptr, "a box of 257 rows");
  check(tma_rows_params(0x2000, 10, 2, 64, int64_t{1} << 40, 64, 2, 128).error != nullptr, "a stride of 2^41 bytes");
}

}  // namespace

int main() {
  check_slots({}, 128);
  check_slots({0}, 128);
  check_slots({1}, 128);
  check_slots({128}, 128);
  check_slots({129, 0, 0, 5, 256, 0}, 128);
  check_slots({0, 0, 0, 300}, 128);
  std::mt19937 rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<int32_t> lengths(1 + rng() % 40);
    for (auto& n : lengths) n = (rng() % 4 == 0) ? 0 : static_cast<int32_t>(rng() % 700);
    check_slots(lengths, trial % 2 ? 128 : 64);
  }
  check_tma();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::puts("sm90_plan: all checks passed");
  return 0;
}
