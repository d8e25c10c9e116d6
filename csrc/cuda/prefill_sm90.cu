// The next generation's sm_90a prefill (prefill_next.h). Not written yet: the launcher refuses.
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "prefill_next.h"

namespace skiplayers::cuda {

template <int D>
bool prefill_sm90_applies() {
  return false;
}

template <typename T, int D>
void launch_prefill_sm90(const PrefillParams<T>&, cudaStream_t) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "skiplayers::varlen_attention (CUDA, SKIPLAYERS_CUDA_KERNELS=next): the sm_90a prefill is not implemented");
}

#define SKIPLAYERS_SM90_INSTANCES(D)                                                      \
  template bool prefill_sm90_applies<D>();                                                \
  template void launch_prefill_sm90<__half, D>(const PrefillParams<__half>&, cudaStream_t); \
  template void launch_prefill_sm90<__nv_bfloat16, D>(const PrefillParams<__nv_bfloat16>&, cudaStream_t);
SKIPLAYERS_SM90_INSTANCES(64)
SKIPLAYERS_SM90_INSTANCES(96)
SKIPLAYERS_SM90_INSTANCES(128)
SKIPLAYERS_SM90_INSTANCES(256)

}  // namespace skiplayers::cuda
