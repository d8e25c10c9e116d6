#include "gemm.h"

#include <ATen/native/CPUBlas.h>

// Fortran BLAS sgemm (LP64), declared weak: it resolves to the copy exported by libtorch_cpu when
// there is one, and to nullptr otherwise.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace skiplayers::cpu {
namespace {

// Row-major C[m, n] = alpha * op(A) . op(B) + beta * C through column-major BLAS: compute C^T.
void blas_rowmajor(bool a_transposed, bool b_transposed, int64_t m, int64_t n, int64_t k, const float* a,
                   int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ta = b_transposed ? 'T' : 'N', tb = a_transposed ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  const float alpha = 1.f;
  sgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

}  // namespace

void gemm_abt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
              int64_t ldc, float* scratch) {
  if (sgemm_) {
    blas_rowmajor(false, true, m, n, k, a, lda, b, ldb, 0.f, c, ldc);
    return;
  }
  // brgemm has no transposed-B form: transpose the n x k block into scratch first.
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < k; ++d) scratch[d * n + j] = b[j * ldb + d];
  at::native::cpublas::brgemm(m, n, k, lda, n, ldc, /*add_C=*/false, a, scratch, c);
}

void gemm_ab_accumulate(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                        float* c, int64_t ldc) {
  if (sgemm_) {
    blas_rowmajor(false, false, m, n, k, a, lda, b, ldb, 1.f, c, ldc);
    return;
  }
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, /*add_C=*/true, a, b, c);
}

}  // namespace skiplayers::cpu
