// Launcher of the next generation's tensor-core decode kernel (decode_mma_kernel.cuh), for
// decode_attention.cu: fp16 / bf16, head dims 64, 96, 128 and 256. No host synchronisation; the
// only runtime queries (occupancy, opting in to more than 48 KiB of dynamic shared memory) run once
// per device and instantiation, on the first call, which the callers make outside graph capture
// (a warm-up), and are cached.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>

#include "decode_mma_kernel.cuh"

namespace skiplayers::cuda {

namespace {
constexpr int kMaxDevices = 64;  // devices past this index query every call (correct, slower)
}

template <typename T, int D>
int decode_mma_blocks_per_sm() {
  static std::atomic<int> cached[kMaxDevices] = {};  // 0: not queried on that device yet
  const int device = at::cuda::current_device();
  if (device < kMaxDevices) {
    if (const int blocks = cached[device].load(std::memory_order_relaxed)) return blocks;
  }
  constexpr int smem = decode_mma::Shape<D>::kBytes;
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(static_cast<size_t>(smem) <= optin, "skiplayers::cache_attention (CUDA, SKIPLAYERS_CUDA_KERNELS=next): ",
              "the tensor-core decode at head dim ", D, " needs ", smem, " bytes of shared memory per block, this GPU ",
              "offers ", optin);
  const auto kernel = decode_mma_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kDecodeMmaThreads, smem));
  TORCH_CHECK(blocks > 0, "skiplayers::cache_attention (CUDA, SKIPLAYERS_CUDA_KERNELS=next): the decode kernel for ",
              "head dim ", D, " does not fit an SM of this GPU (", smem, " bytes of shared memory)");
  if (device < kMaxDevices) cached[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

template <typename T, int D>
void launch_decode_mma(const DecodeParams<T>& p, int64_t kv_heads, cudaStream_t stream) {
  decode_mma_blocks_per_sm<T, D>();  // the shared-memory opt-in, once per device
  const dim3 grid(tiles_upper_bound(p.total_q, p.batch, p.group, kDecodeMmaRows), kv_heads, p.num_splits);
  decode_mma_kernel<T, D><<<grid, kDecodeMmaThreads, decode_mma::Shape<D>::kBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define SKIPLAYERS_DECODE_MMA_INSTANCES(T, D)  \
  template int decode_mma_blocks_per_sm<T, D>(); \
  template void launch_decode_mma<T, D>(const DecodeParams<T>&, int64_t, cudaStream_t);
SKIPLAYERS_DECODE_MMA_INSTANCES(__half, 64)
SKIPLAYERS_DECODE_MMA_INSTANCES(__half, 96)
SKIPLAYERS_DECODE_MMA_INSTANCES(__half, 128)
SKIPLAYERS_DECODE_MMA_INSTANCES(__half, 256)
SKIPLAYERS_DECODE_MMA_INSTANCES(__nv_bfloat16, 64)
SKIPLAYERS_DECODE_MMA_INSTANCES(__nv_bfloat16, 96)
SKIPLAYERS_DECODE_MMA_INSTANCES(__nv_bfloat16, 128)
SKIPLAYERS_DECODE_MMA_INSTANCES(__nv_bfloat16, 256)
#undef SKIPLAYERS_DECODE_MMA_INSTANCES

}  // namespace skiplayers::cuda
