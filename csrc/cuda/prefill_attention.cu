// CUDA launcher of skiplayers::varlen_attention (prefill over packed ragged batches).
// Stable generation (kernel_generation.h): fp16 / bf16 run the tensor-core kernel
// (prefill_mma_kernel.cuh), fp32 the FMA kernel (prefill_fma_kernel.cuh). Next generation:
// launch_prefill_next (prefill_next.h). Metadata values (cu_seqlens) are checked on the device.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/op_checks.h"
#include "kernel_generation.h"
#include "launch_utils.h"
#include "prefill_fma_kernel.cuh"
#include "prefill_mma_kernel.cuh"
#include "prefill_next.h"

namespace skiplayers::cuda {
namespace {

constexpr const char* kOp = "skiplayers::varlen_attention";

template <typename T>
PrefillParams<T> prefill_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_q, const at::Tensor& cu_k, const at::Tensor& q_pos,
                                const at::Tensor& k_pos, const std::optional<at::Tensor>& q_tag,
                                const std::optional<at::Tensor>& k_tag, int64_t rule, double scale,
                                const AttentionShape& s, at::Tensor& out) {
  PrefillParams<T> p;
  p.q = reinterpret_cast<const T*>(q.data_ptr());
  p.q_token_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k = reinterpret_cast<const T*>(k.data_ptr());
  p.k_token_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v = reinterpret_cast<const T*>(v.data_ptr());
  p.v_token_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.q_pos = q_pos.data_ptr<int32_t>();
  p.k_pos = k_pos.data_ptr<int32_t>();
  p.q_tag = optional_int_ptr(q_tag);
  p.k_tag = optional_int_ptr(k_tag);
  p.out = reinterpret_cast<T*>(out.data_ptr());
  p.batch = static_cast<int32_t>(s.batch);
  p.heads = static_cast<int32_t>(s.heads);
  p.group = static_cast<int32_t>(s.heads / s.kv_heads);
  p.total_q = s.num_queries;
  p.total_k = k.size(0);
  p.rule = rule;
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  return p;
}

at::Tensor varlen_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                 const at::Tensor& q_pos_in, const at::Tensor& k_pos_in,
                                 const std::optional<at::Tensor>& q_tag_in,
                                 const std::optional<at::Tensor>& k_tag_in, int64_t rule, double scale) {
  const AttentionShape s =
      check_varlen_attention(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, q_pos_in, k_pos_in, q_tag_in, k_tag_in, rule);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const KernelGeneration generation = kernel_generation();
  check_head_dim(generation, s.head_dim, kOp);
  check_compute_capability(kOp);
  TORCH_CHECK(s.batch < (1ll << 31) && s.num_queries < (1ll << 31) && k_in.size(0) < (1ll << 31), kOp,
              " (CUDA): at most 2^31 - 1 sequences and rows");
  TORCH_CHECK(s.kv_heads <= 65535, kOp, " (CUDA): at most 65535 KV heads, got ", s.kv_heads);
  const at::Tensor q = aligned16(dense_last_dim(q_in));
  const at::Tensor k = aligned16(dense_last_dim(k_in));
  const at::Tensor v = aligned16(dense_last_dim(v_in));
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const at::Tensor q_pos = q_pos_in.contiguous(), k_pos = k_pos_in.contiguous();
  const std::optional<at::Tensor> q_tag = optional_contiguous(q_tag_in), k_tag = optional_contiguous(k_tag_in);

  at::Tensor out = at::empty({s.num_queries, s.heads, s.head_dim}, q.options());
  if (s.empty()) return out;
  const int64_t group = s.heads / s.kv_heads;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (generation == KernelGeneration::kNext) {
    dispatch_next_head_dim(s.head_dim, kOp, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      dispatch_float(q.scalar_type(), kOp, [&](auto tag) {
        using T = typename decltype(tag)::type;
        launch_prefill_next<T, D>(
            prefill_params<T>(q, k, v, cu_q, cu_k, q_pos, k_pos, q_tag, k_tag, rule, scale, s, out), stream);
      });
    });
    return out;
  }
  dispatch_stable_head_dim(s.head_dim, kOp, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    dispatch_float(q.scalar_type(), kOp, [&](auto tag) {
      using T = typename decltype(tag)::type;
      const PrefillParams<T> p =
          prefill_params<T>(q, k, v, cu_q, cu_k, q_pos, k_pos, q_tag, k_tag, rule, scale, s, out);
      if constexpr (std::is_same_v<T, float>) {
        const dim3 grid(tiles_upper_bound(s.num_queries, s.batch, group, kPrefillFmaRows), s.kv_heads);
        prefill_fma_kernel<D><<<grid, kPrefillFmaThreads, 0, stream>>>(p);
      } else {
        const dim3 grid(tiles_upper_bound(s.num_queries, s.batch, group, kPrefillMmaRows), s.kv_heads);
        prefill_mma_kernel<T, D><<<grid, kPrefillMmaThreads, 0, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(skiplayers, CUDA, m) { m.impl("varlen_attention", &varlen_attention_cuda); }

}  // namespace skiplayers::cuda
