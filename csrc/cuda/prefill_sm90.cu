// The next generation's sm_90a prefill (prefill_next.h): launcher of prefill_sm90_kernel.cuh.
//
// Per call, on the stream, no host synchronisation:
//   1. sm90_plan_kernel: the (sequence, tile) of every query tile and the BlockSummary of every key
//      block of every sequence (sm90_plan.h slots) into a workspace of host-known size; the device-side
//      checks of cu_seqlens,
//   2. prefill_sm90_kernel: grid (query tiles upper bound, kv_heads), 384 threads, dynamic shared
//      memory opted in, two TMA descriptors (K and V) as __grid_constant__ parameters.
// The descriptors are encoded on the host with cuTensorMapEncodeTiled, reached through
// cudaGetDriverEntryPointByVersion (no -lcuda link).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000

#include <cmath>
#include <mutex>
#include <type_traits>

#include "launch_utils.h"
#include "prefill_next.h"
#include "prefill_sm90_kernel.cuh"

namespace skiplayers::cuda {
namespace {

constexpr const char* kOp = "skiplayers::varlen_attention (CUDA, SKIPLAYERS_CUDA_KERNELS=next, sm_90a prefill)";

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status);
    TORCH_CHECK(err == cudaSuccess && status == cudaDriverEntryPointSuccess && ptr != nullptr, kOp,
                ": the CUDA driver has no cuTensorMapEncodeTiled (", cudaGetErrorString(err), ")");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// The TMA descriptor of K or V rows [total_k, kv_heads, D] (sm90_plan.h tma_rows_params). With no keys
// there is nothing to describe: the kernel then loads no block and the descriptor stays zero.
template <typename T>
CUtensorMap rows_tensor_map(const T* base, int64_t total_k, int64_t kv_heads, int64_t head_dim, int64_t token_stride,
                            int64_t head_stride) {
  CUtensorMap map{};
  if (total_k == 0) return map;
  const skiplayers::sm90::TmaRowsParams t =
      skiplayers::sm90::tma_rows_params(reinterpret_cast<uintptr_t>(base), total_k, kv_heads, head_dim, token_stride,
                                        head_stride, sizeof(T), sm90::kKeys);
  TORCH_CHECK(t.error == nullptr, kOp, ": K / V rows cannot be described for TMA: ", t.error);
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUtensorMapDataType dtype =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult r = tensor_map_encoder()(&map, dtype, 3, const_cast<T*>(base), t.dims, t.strides, t.box,
                                          element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, kOp, ": cuTensorMapEncodeTiled failed (CUresult ", static_cast<int>(r), ")");
  return map;
}

// Whether the loaded binary holds the sm_90a build of the kernel for the current device: only that
// build declares the static shared memory Sm90Config::Small, over 1 KiB (the other builds are a trap
// stub with none, or only sm_90's 1 KiB reservation; the figure may be padded).
template <typename T, int D>
bool sm90_kernel_loaded() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, sm90::prefill_sm90_kernel<T, D>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.sharedSizeBytes >= sizeof(typename sm90::Sm90Config<T, D>::Small);
}

template <int D>
bool sm90_built_for_current_device() {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static bool built[kMaxDevices];
  const int device = c10::cuda::current_device();
  if (device < 0 || device >= kMaxDevices) return false;
  std::call_once(once[device], [&] {
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    built[device] = prop->major == 9 && prop->minor == 0 && sm90_kernel_loaded<__half, D>() &&
                    sm90_kernel_loaded<__nv_bfloat16, D>();
  });
  return built[device];
}

// Whether TMA can describe the K and V rows of p (sm90_plan.h tma_rows_params): not, e.g., a view
// that repeats one KV head with a zero stride, which the other kernels take.
template <typename T, int D>
bool rows_describable(const PrefillParams<T>& p) {
  if (p.total_k == 0) return true;
  const int64_t kv_heads = p.heads / p.group;
  auto ok = [&](const T* base, int64_t token_stride, int64_t head_stride) {
    return skiplayers::sm90::tma_rows_params(reinterpret_cast<uintptr_t>(base), p.total_k, kv_heads, D,
                                             token_stride, head_stride, sizeof(T), sm90::kKeys)
               .error == nullptr;
  };
  return ok(p.k, p.k_token_stride, p.k_head_stride) && ok(p.v, p.v_token_stride, p.v_head_stride);
}

}  // namespace

// The sm_90a kernel takes head dims 64 and 128 on a device of compute capability exactly 9.0 whose
// binary holds the sm_90a build (TORCH_CUDA_ARCH_LIST with "9.0a"), when TMA can describe K and V;
// the rest go to the sm_80-class kernel (prefill_fa2.cu).
template <typename T, int D>
bool prefill_sm90_applies(const PrefillParams<T>& p) {
  if constexpr (D != 64 && D != 128) {
    return false;
  } else {
    return sm90_built_for_current_device<D>() && rows_describable<T, D>(p);
  }
}

template <typename T, int D>
void launch_prefill_sm90(const PrefillParams<T>& p, cudaStream_t stream) {
  if constexpr (D != 64 && D != 128) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, kOp, ": head_dim ", D, " is not built (64 and 128 only)");
  } else {
    using Config = sm90::Sm90Config<T, D>;
    TORCH_CHECK(std::isfinite(p.scale_log2), kOp, ": the softmax scale must be finite");
    TORCH_CHECK(p.total_k < (int64_t{1} << 31) && p.total_q * p.group < (int64_t{1} << 31), kOp,
                ": at most 2^31 - 1 key rows and query rows x group (32-bit tile row math)");
    TORCH_CHECK(p.heads % p.group == 0 && p.heads / p.group <= 65535, kOp, ": at most 65535 KV heads");
    const int64_t kv_heads = p.heads / p.group;

    // 1. the plan: query tile coordinates and key block summaries, in one workspace
    const int64_t tiles = tiles_upper_bound(p.total_q, p.batch, p.group, sm90::kRows);
    const int64_t slots = skiplayers::sm90::key_block_slots(p.total_k, p.batch, sm90::kKeys);
    TORCH_CHECK(tiles < (int64_t{1} << 31) && slots < (int64_t{1} << 31), kOp, ": too many query tiles or key blocks");
    if (tiles == 0) return;
    const int64_t tile_bytes = round_up(tiles * static_cast<int64_t>(sizeof(TileCoord)), 16);
    at::Tensor workspace =
        at::empty({tile_bytes + slots * static_cast<int64_t>(sizeof(BlockSummary))},
                  at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device()));
    auto* tile_coords = reinterpret_cast<TileCoord*>(workspace.data_ptr());
    auto* sums = reinterpret_cast<BlockSummary*>(static_cast<char*>(workspace.data_ptr()) + tile_bytes);
    const int64_t plan_items = tiles > slots ? tiles : slots;
    sm90::sm90_plan_kernel<<<static_cast<unsigned>(ceil_div(plan_items, sm90::kPlanWarps)), sm90::kPlanWarps * 32, 0,
                             stream>>>(p.cu_seqlens_q, p.cu_seqlens_k, p.k_pos, p.k_tag, p.batch, p.group, p.total_q,
                                       p.total_k, tiles, slots, tile_coords, sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // 2. attention
    sm90::Sm90Args<T, D> args;
    args.p = p;
    args.tma_k = rows_tensor_map(p.k, p.total_k, kv_heads, D, p.k_token_stride, p.k_head_stride);
    args.tma_v = rows_tensor_map(p.v, p.total_k, kv_heads, D, p.v_token_stride, p.v_head_stride);
    args.tiles = tile_coords;
    args.key_blocks = sums;
    // The kernel takes the row max before scaling, so it needs a positive scale: fold a negative
    // scale's sign into Q (flipping 16-bit sign bits is exact: S -> -S), and for a zero scale zero Q
    // (S = 0 exactly, scale 1): the same scores s * scale for every finite scale.
    const float scale = p.scale_log2;
    args.scale_log2 = scale == 0.f ? 1.f : std::fabs(scale);
    args.q_and = scale == 0.f ? 0u : 0xffffffffu;
    args.q_xor = scale < 0.f ? 0x80008000u : 0u;
    auto* kernel = sm90::prefill_sm90_kernel<T, D>;
    // Opt in to more than 48 KiB of dynamic shared memory (per device: set on every launch, no sync).
    opt_in_dynamic_shared(kernel, Config::kDynamicSmem, kOp, D);
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(kv_heads));
    kernel<<<grid, sm90::kThreads, Config::kDynamicSmem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

#define SKIPLAYERS_SM90_INSTANCES(D)                                                      \
  template bool prefill_sm90_applies<__half, D>(const PrefillParams<__half>&);            \
  template bool prefill_sm90_applies<__nv_bfloat16, D>(const PrefillParams<__nv_bfloat16>&); \
  template void launch_prefill_sm90<__half, D>(const PrefillParams<__half>&, cudaStream_t); \
  template void launch_prefill_sm90<__nv_bfloat16, D>(const PrefillParams<__nv_bfloat16>&, cudaStream_t);
SKIPLAYERS_SM90_INSTANCES(64)
SKIPLAYERS_SM90_INSTANCES(96)
SKIPLAYERS_SM90_INSTANCES(128)
SKIPLAYERS_SM90_INSTANCES(256)

}  // namespace skiplayers::cuda
