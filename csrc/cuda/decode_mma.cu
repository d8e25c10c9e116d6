// Launcher of the next generation's tensor-core decode kernel (decode_mma_kernel.cuh), for
// decode_attention.cu: fp16 / bf16, head dims 64, 96, 128 and 256, with 3 or 2 pipeline stages
// (what the GPU's shared memory per block takes). No host synchronisation; the only runtime queries
// (shared memory per block, occupancy, opting in to more than 48 KiB of dynamic shared memory) run
// once per device and instantiation, on the first call, which the callers make outside graph
// capture (a warm-up), and are cached.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>

#include "decode_mma_kernel.cuh"
#include "launch_utils.h"

namespace skiplayers::cuda {

namespace {

constexpr int kMaxDevices = 64;  // devices past this index query every call (correct, slower)
constexpr const char* kOp = "skiplayers::cache_attention (CUDA, SKIPLAYERS_CUDA_KERNELS=next)";

// Stage buffers of the pipeline at head dim D: 3 for D <= 128 (two stages in flight while one is
// computed), 2 for D = 256 (its stages are twice the bytes). A GPU whose shared memory per block
// (sharedMemPerBlockOptin) is below the 3-stage need (99 KiB on sm_86 / sm_89 against 108 KiB at
// D = 128) runs the 2-stage instance instead.
template <int D>
constexpr int kPreferredStages = D <= 128 ? 3 : 2;

struct MmaConfig {
  int stages;
  int blocks_per_sm;
};

// Opts the instance in to its dynamic shared memory and returns its resident blocks per SM.
template <typename T, int D, int STAGES>
int opt_in() {
  constexpr int smem = decode_mma::Shape<D, STAGES>::kBytes;
  const auto kernel = decode_mma_kernel<T, D, STAGES>;
  opt_in_dynamic_shared(kernel, smem, kOp, D);
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kDecodeMmaThreads, smem));
  TORCH_CHECK(blocks > 0, kOp, ": the decode kernel for head dim ", D, " does not fit an SM of this GPU (", smem,
              " bytes of shared memory)");
  return blocks;
}

template <typename T, int D>
MmaConfig query_config() {
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  if constexpr (kPreferredStages<D> == 3) {
    if (static_cast<size_t>(decode_mma::Shape<D, 3>::kBytes) <= optin) return MmaConfig{3, opt_in<T, D, 3>()};
  }
  return MmaConfig{2, opt_in<T, D, 2>()};
}

// The current device's configuration, queried once per device (the first call, outside any graph
// capture) and cached as stages << 16 | blocks.
template <typename T, int D>
MmaConfig mma_config() {
  static std::atomic<int> cached[kMaxDevices] = {};  // 0: not queried on that device yet
  const int device = at::cuda::current_device();
  if (device < kMaxDevices) {
    if (const int packed = cached[device].load(std::memory_order_relaxed)) return MmaConfig{packed >> 16, packed & 0xffff};
  }
  const MmaConfig config = query_config<T, D>();
  if (device < kMaxDevices) cached[device].store(config.stages << 16 | config.blocks_per_sm, std::memory_order_relaxed);
  return config;
}

}  // namespace

template <typename T, int D>
int decode_mma_blocks_per_sm() {
  return mma_config<T, D>().blocks_per_sm;
}

template <typename T, int D>
void launch_decode_mma(const DecodeParams<T>& p, int64_t kv_heads, cudaStream_t stream) {
  const dim3 grid(tiles_upper_bound(p.total_q, p.batch, p.group, kDecodeMmaRows), kv_heads, p.num_splits);
  if (mma_config<T, D>().stages == 3) {
    if constexpr (kPreferredStages<D> == 3) {
      decode_mma_kernel<T, D, 3><<<grid, kDecodeMmaThreads, decode_mma::Shape<D, 3>::kBytes, stream>>>(p);
    }
  } else {
    decode_mma_kernel<T, D, 2><<<grid, kDecodeMmaThreads, decode_mma::Shape<D, 2>::kBytes, stream>>>(p);
  }
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
