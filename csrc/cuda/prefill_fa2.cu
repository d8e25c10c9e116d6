// The next generation's sm_80 prefill and fp32 prefill (prefill_next.h):
//   launch_prefill_fa2<T, D>   fp16 / bf16, FlashAttention-2-class mma.sync kernel (prefill_fa2_kernel.cuh),
//                              one instance per rule class (causal only / general)
//   launch_prefill_fp32<D>     fp32 FMA kernel (prefill_fma_kernel.cuh) with the tile of FmaTile<D>
// No host synchronisation: both launch on `stream` and are capturable in a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "launch_utils.h"
#include "prefill_fa2_kernel.cuh"
#include "prefill_fma_kernel.cuh"
#include "prefill_next.h"

namespace skiplayers::cuda {
namespace {

constexpr const char* kOp = "skiplayers::varlen_attention (CUDA, SKIPLAYERS_CUDA_KERNELS=next)";

template <typename T, int D, int kRuleClass>
void launch_fa2_instance(const PrefillParams<T>& p, cudaStream_t stream) {
  using Cfg = Fa2Config<D>;
  const auto kernel = prefill_fa2_kernel<T, D, kRuleClass>;
  opt_in_dynamic_shared(kernel, Cfg::kSharedBytes, kOp, D);  // refused where smaller (sm_86 / sm_89 at D = 256)
  const dim3 grid(static_cast<unsigned>(tiles_upper_bound(p.total_q, p.batch, p.group, Cfg::kRows)),
                  static_cast<unsigned>(p.heads / p.group));
  kernel<<<grid, Cfg::kThreads, Cfg::kSharedBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T, int D>
void launch_prefill_fa2(const PrefillParams<T>& p, cudaStream_t stream) {
  // A scale <= 0 is folded into Q by the kernel (softmax_sm80.cuh needs c > 0); a non-finite one
  // has no meaningful softmax.
  TORCH_CHECK(std::isfinite(p.scale_log2), kOp, ": the softmax scale must be finite");
  if (p.rule == 0) launch_fa2_instance<T, D, kRuleCausal>(p, stream);
  else launch_fa2_instance<T, D, kRuleGeneral>(p, stream);
}

template <int D>
void launch_prefill_fp32(const PrefillParams<float>& p, cudaStream_t stream) {
  using Tile = FmaTile<D>;
  const dim3 grid(static_cast<unsigned>(tiles_upper_bound(p.total_q, p.batch, p.group, Tile::kRows)),
                  static_cast<unsigned>(p.heads / p.group));
  prefill_fma_kernel<D, Tile::kRows, Tile::kKeys><<<grid, Tile::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define SKIPLAYERS_FA2_INSTANCES(D)                                                      \
  template void launch_prefill_fa2<__half, D>(const PrefillParams<__half>&, cudaStream_t); \
  template void launch_prefill_fa2<__nv_bfloat16, D>(const PrefillParams<__nv_bfloat16>&, cudaStream_t); \
  template void launch_prefill_fp32<D>(const PrefillParams<float>&, cudaStream_t);
SKIPLAYERS_FA2_INSTANCES(64)
SKIPLAYERS_FA2_INSTANCES(96)
SKIPLAYERS_FA2_INSTANCES(128)
SKIPLAYERS_FA2_INSTANCES(256)

}  // namespace skiplayers::cuda
