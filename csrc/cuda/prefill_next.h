// The next generation's prefill (kernel_generation.h): which kernel runs a varlen_attention call.
//
//   fp16 / bf16 on an sm_90 device, head dims the sm_90a kernel takes  -> launch_prefill_sm90 (prefill_sm90.cu)
//   fp16 / bf16 otherwise                                               -> launch_prefill_fa2  (prefill_fa2.cu)
//   fp32                                                                -> launch_prefill_fp32 (prefill_fa2.cu)
//
// Each launcher takes the parameters of prefill_common.cuh (q/k/v rows with a dense, 16-byte
// aligned last dim; the launcher of prefill_attention.cu has checked the inputs) and launches on
// `stream` with no host synchronisation. T: float, __half or __nv_bfloat16; D: 64, 96, 128 or 256.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "prefill_common.cuh"

namespace skiplayers::cuda {

// True when this call runs the sm_90a kernel: the current device is sm_90, the kernel is built for
// head dim D, and TMA can describe p's K and V rows (e.g. not a zero stride of an expanded view)
// (prefill_sm90.cu).
template <typename T, int D>
bool prefill_sm90_applies(const PrefillParams<T>& p);

template <typename T, int D>
void launch_prefill_sm90(const PrefillParams<T>& p, cudaStream_t stream);

template <typename T, int D>
void launch_prefill_fa2(const PrefillParams<T>& p, cudaStream_t stream);

template <int D>
void launch_prefill_fp32(const PrefillParams<float>& p, cudaStream_t stream);

template <typename T, int D>
void launch_prefill_next(const PrefillParams<T>& p, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    launch_prefill_fp32<D>(p, stream);
  } else if (prefill_sm90_applies<T, D>(p)) {
    launch_prefill_sm90<T, D>(p, stream);
  } else {
    launch_prefill_fa2<T, D>(p, stream);
  }
}

}  // namespace skiplayers::cuda
