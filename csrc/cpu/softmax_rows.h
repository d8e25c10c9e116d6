// Vectorised row primitives of the CPU online softmax (base 2: scores arrive pre-multiplied by
// log2(e), so exp2 replaces exp). Built with GCC function multi-versioning: each function is
// compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time, so the extension
// runs on any x86-64 machine and uses the widest vectors the machine has.
#pragma once

#include <cstdint>

namespace skiplayers::cpu {

// max(init, s[0..n)).
float row_max(const float* s, int64_t n, float init);

// s[j] = exp2(s[j] - shift) in place (exactly 0 for -inf scores); returns the sum of the new s.
// `shift` must be finite and >= every s[j].
float exp2_shifted_inplace(float* s, int64_t n, float shift);

// x[0..n) *= factor.
void scale_row(float* x, int64_t n, float factor);

// Converts n values to float, multiplying by `factor`.
template <typename scalar_t>
void load_scaled(const scalar_t* src, float* dst, int64_t n, float factor);

}  // namespace skiplayers::cpu
