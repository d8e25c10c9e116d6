// Bit masks of key blocks (prefill_key_blocks.cuh): bit i of a mask is word i / 32, bit i % 32.
// Torch-free and CUDA-free so the host tests (tests/cpp/visibility_test.cpp) run the same scan the
// kernels do.
#pragma once

#include <cstdint>

#include "skiplayers/visibility.h"  // SKIPLAYERS_HD

namespace skiplayers {

// Index of the lowest set bit of a non-zero word.
SKIPLAYERS_HD int lowest_set_bit(uint32_t word) {
#if defined(__CUDA_ARCH__)
  return __ffs(static_cast<int>(word)) - 1;
#else
  return __builtin_ctz(word);
#endif
}

// The first set bit at or after `from` (0 <= from < 32 * n_words) among words[0 .. n_words), or -1.
SKIPLAYERS_HD int first_set_bit_from(const uint32_t* words, int n_words, int from) {
  int word = from / 32;
  uint32_t bits = words[word] & (0xffffffffu << (from % 32));
  while (bits == 0u && ++word < n_words) bits = words[word];
  return bits == 0u ? -1 : word * 32 + lowest_set_bit(bits);
}

}  // namespace skiplayers
