// Online-softmax arithmetic of the next-generation attention kernels (sm_80+), shareable by the
// mma.sync kernel (prefill_fa2_kernel.cuh) and a wgmma one: the fast hardware exp2 and the update
// of a row's running maximum.
//
// Base 2 throughout: with c = softmax scale * log2(e) (PrefillParams::scale_log2, c > 0), a row's
// probabilities are exp2(s * c - m), s the raw fp32 score and m the running maximum of the *scaled*
// scores s * c. The maximum is taken on the raw scores and scaled once per row (max(s) * c =
// max(s * c) because c > 0), so each score costs one FFMA and one MUFU.EX2:
//
//   p = fast_exp2(fmaf(s, c, -m))
//
// Masked scores are -inf: fmaf(-inf, c, -m) = -inf and ex2(-inf) = +0. A row that has seen no
// visible key keeps m = -inf; it is then shifted by 0 instead (never -inf - -inf = NaN), so its
// probabilities and its sum stay exactly 0 and the kernel writes zeros.
#pragma once

#include <cmath>

namespace skiplayers::cuda {

// 2^x with the SFU instruction (MUFU.EX2): ex2.approx.ftz.f32, relative error ~2^-22, subnormal
// results flushed to 0, ex2(-inf) = +0. exp2f() would add a range reduction around it.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Folds a key block into a row's running maximum. `m`: the maximum of the scaled scores so far
// (-inf: none visible yet), `block_max`: the raw maximum of this block's scores of the row (-inf
// when all masked), `scale_log2` > 0. Returns the factor alpha = exp2(m_old - m_new) that rescales
// the row's accumulator and sum; `neg_shift` receives -m_new (0 while the row has seen nothing) for
// the per-score FMA fmaf(s, scale_log2, neg_shift).
__device__ __forceinline__ float softmax_update_max(float& m, float block_max, float scale_log2, float& neg_shift) {
  const float m_new = fmaxf(m, block_max * scale_log2);
  const float shift = m_new == -INFINITY ? 0.f : m_new;
  const float alpha = fast_exp2(m - shift);  // m = -inf: 0 (the accumulator is 0 anyway)
  m = m_new;
  neg_shift = -shift;
  return alpha;
}

}  // namespace skiplayers::cuda
