// The next generation's sm_80 prefill and fp32 prefill (prefill_next.h). Not written yet: the
// launchers refuse.
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "prefill_next.h"

namespace skiplayers::cuda {

template <typename T, int D>
void launch_prefill_fa2(const PrefillParams<T>&, cudaStream_t) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "skiplayers::varlen_attention (CUDA, SKIPLAYERS_CUDA_KERNELS=next): the sm_80 prefill is not implemented");
}

template <int D>
void launch_prefill_fp32(const PrefillParams<float>&, cudaStream_t) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "skiplayers::varlen_attention (CUDA, SKIPLAYERS_CUDA_KERNELS=next): the fp32 prefill is not implemented");
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
