// Host-side helpers of the CUDA launchers: dtype mapping, alignment normalisation, device facts.
// Torch-facing; the input checks themselves are the shared ones of csrc/common/op_checks.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "../common/op_checks.h"

namespace skiplayers::cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with the device element type of a float tensor dtype.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(TypeTag<float>{}); break;
    case at::kHalf: fn(TypeTag<__half>{}); break;
    case at::kBFloat16: fn(TypeTag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

// Largest power of two <= 16 that divides the address of every row of a tensor with a dense last
// dimension: the data pointer, the byte strides of the other dims (those of size > 1) and the
// byte size of a row.
inline int64_t row_alignment(const at::Tensor& t) {
  int64_t a = 16;
  auto fold = [&](uint64_t x) {
    while (a > 1 && x % a != 0) a /= 2;
  };
  fold(reinterpret_cast<uintptr_t>(t.data_ptr()));
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1) fold(static_cast<uint64_t>(t.stride(d) * t.element_size()));
  fold(static_cast<uint64_t>(t.size(-1) * t.element_size()));
  return a;
}

// The attention kernels read rows (last dim dense) with 16-byte vector loads: a tensor whose rows
// are not 16-byte aligned (an odd view) is copied into a fresh, aligned, contiguous buffer first.
inline at::Tensor aligned16(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.stride(-1) == 1 || t.size(-1) <= 1);
  if (t.numel() == 0 || row_alignment(t) == 16) return t;
  return t.clone(at::MemoryFormat::Contiguous);  // a new allocation: aligned
}

// A paged K/V pool as the kernels address it (op_checks.h pool_slots), its rows 16-byte aligned.
inline PoolSlots aligned_pool_slots(const at::Tensor& pool_in) {
  const PoolSlots slots = pool_slots(pool_in);
  const at::Tensor aligned = aligned16(slots.pool);
  return aligned.is_same(slots.pool) ? slots : pool_slots(aligned);
}

inline const int32_t* optional_int_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<int32_t>() : nullptr;
}

inline std::optional<at::Tensor> optional_contiguous(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// The kernels use cp.async, ldmatrix and bf16 mma: sm_80 or newer.
inline void check_compute_capability(const char* op) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, op, " (CUDA) needs a GPU of compute capability 8.0 or newer, this one is ",
              prop->major, ".", prop->minor);
}

// Opts `kernel` in to `bytes` of dynamic shared memory per block (a launch above the 48 KiB default
// needs it), after checking the current device's per-block maximum: a GPU with less is refused with
// a NotImplementedError naming what needs the memory (`op` at `head_dim`).
template <typename Kernel>
void opt_in_dynamic_shared(Kernel kernel, size_t bytes, const char* op, int64_t head_dim) {
  if (bytes <= 48 * 1024) return;
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK_NOT_IMPLEMENTED(bytes <= optin, op, ": head_dim ", head_dim, " needs ", bytes,
                              " bytes of shared memory per block, this GPU offers ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

inline int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

}  // namespace skiplayers::cuda
