// Which generation of the CUDA attention kernels the launchers run.
//
//   stable  the kernels verified on an H100 (prefill_mma/fma, decode_split/combine): the default.
//   next    the "GPU speed, part 2" kernels: the sm_90a prefill (TMA + wgmma, prefill_sm90.cu), the
//           FlashAttention-2-class sm_80 prefill (prefill_fa2.cu) and tensor-core decode
//           (decode_mma.cu), with head dims 64, 96, 128 and 256. They are built and checked statically
//           (tests/test_cuda_static.py) but become the default only once the op tests and the
//           benchmarks have passed on a GPU (scripts/gpu_check.sh runs both generations).
//
// Chosen per call by the environment variable SKIPLAYERS_CUDA_KERNELS (unset: stable), so a
// benchmark can time both generations in one process; any other value is refused.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace skiplayers::cuda {

enum class KernelGeneration { kStable, kNext };

inline KernelGeneration kernel_generation() {
  const char* value = std::getenv("SKIPLAYERS_CUDA_KERNELS");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "stable") == 0) return KernelGeneration::kStable;
  if (std::strcmp(value, "next") == 0) return KernelGeneration::kNext;
  TORCH_CHECK(false, "SKIPLAYERS_CUDA_KERNELS must be 'stable' or 'next', got '", value, "'");
}

// The head dims each generation instantiates (a bounded set of templates): stable 64 and 128, next
// also 96 and 256.
inline bool head_dim_supported(KernelGeneration g, int64_t head_dim) {
  if (head_dim == 64 || head_dim == 128) return true;
  return g == KernelGeneration::kNext && (head_dim == 96 || head_dim == 256);
}

inline void check_head_dim(KernelGeneration g, int64_t head_dim, const char* op) {
  if (g == KernelGeneration::kStable) {
    TORCH_CHECK(head_dim_supported(g, head_dim), op, " (CUDA): head_dim must be 64 or 128, got ", head_dim,
                " (SKIPLAYERS_CUDA_KERNELS=next also takes 96 and 256)");
  } else {
    TORCH_CHECK(head_dim_supported(g, head_dim), op, " (CUDA): head_dim must be 64, 96, 128 or 256, got ", head_dim);
  }
}

// Calls fn(std::integral_constant<int, D>{}) with the head dim as a constant, D in 64 / 128.
template <typename Fn>
void dispatch_stable_head_dim(int64_t head_dim, const char* op, Fn&& fn) {
  check_head_dim(KernelGeneration::kStable, head_dim, op);
  if (head_dim == 64) fn(std::integral_constant<int, 64>{});
  else fn(std::integral_constant<int, 128>{});
}

// The same for the next generation's head dims, 64 / 96 / 128 / 256.
template <typename Fn>
void dispatch_next_head_dim(int64_t head_dim, const char* op, Fn&& fn) {
  check_head_dim(KernelGeneration::kNext, head_dim, op);
  switch (head_dim) {
    case 64: fn(std::integral_constant<int, 64>{}); break;
    case 96: fn(std::integral_constant<int, 96>{}); break;
    case 128: fn(std::integral_constant<int, 128>{}); break;
    default: fn(std::integral_constant<int, 256>{}); break;
  }
}

}  // namespace skiplayers::cuda
