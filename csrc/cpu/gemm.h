// The two small float32 GEMMs of the CPU attention engine, row-major.
//
// They call the BLAS sgemm that libtorch_cpu carries (MKL in the x86-64 builds of torch) when the
// loaded torch exports one, and otherwise oneDNN's brgemm through ATen's cpublas. Both compute the
// same product; on the pinned torch (2.14.1, x86-64) MKL's sgemm is about twice as fast as brgemm at
// these shapes (a few hundred rows x 64..128), which is why it is preferred.
#pragma once

#include <cstdint>

namespace skiplayers::cpu {

// C[m, n] = A[m, k] . B[n, k]^T   (scores = queries . keys^T). `scratch` holds k * n floats.
void gemm_abt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
              int64_t ldc, float* scratch);

// C[m, n] += A[m, k] . B[k, n]   (acc += probabilities . values).
void gemm_ab_accumulate(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                        float* c, int64_t ldc);

}  // namespace skiplayers::cpu
