#include "softmax_rows.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SKIPLAYERS_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define SKIPLAYERS_CLONES
#endif

namespace skiplayers::cpu {
namespace {

// 2^x for x <= 0 to ~1 ulp, written so that GCC vectorises it (no libm call, no branches):
// x = n + f with n = round(x), |f| <= 1/2; 2^f by its degree-7 Taylor polynomial (truncation
// error < 6e-9 relative, under float's epsilon); 2^n by building the exponent bits.
inline float exp2_nonpositive(float x) {
  const bool underflow = x < -125.f;  // also catches -inf from masked scores
  x = underflow ? -125.f : x;
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (x + magic) - magic;
  const float f = x - n;
  float p = 1.5252733804059840e-05f;
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float two_n = __builtin_bit_cast(float, bits);
  return underflow ? 0.f : p * two_n;
}

}  // namespace

SKIPLAYERS_CLONES float row_max(const float* s, int64_t n, float init) {
  float m = init;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

SKIPLAYERS_CLONES float exp2_shifted_inplace(float* s, int64_t n, float shift) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp2_nonpositive(s[j] - shift);
    s[j] = e;
    sum += e;
  }
  return sum;
}

SKIPLAYERS_CLONES void scale_row(float* x, int64_t n, float factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

template <typename scalar_t>
void load_scaled(const scalar_t* src, float* dst, int64_t n, float factor) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]) * factor;
}

template void load_scaled<float>(const float*, float*, int64_t, float);
template void load_scaled<c10::BFloat16>(const c10::BFloat16*, float*, int64_t, float);
template void load_scaled<c10::Half>(const c10::Half*, float*, int64_t, float);

}  // namespace skiplayers::cpu
