// CUDA launcher of skiplayers::cache_attention (decode over paged KV caches): a split-K kernel,
// then the combine kernel when there are splits (decode_common.cuh). No host synchronisation, so a
// decode step can be captured in a CUDA graph; cache lengths and the block table entries of the
// slots in use are checked on the device.
//
//   stable                 decode_split_kernel (decode_kernel.cuh), head dims 64 / 128
//   next, fp16 / bf16      decode_mma_kernel (tensor cores; decode_mma.cu), head dims 64 / 96 / 128 / 256
//   next, fp32             decode_split_kernel (exact to the fp32 policy), head dims 64 / 96 / 128 / 256
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../common/op_checks.h"
#include "decode_kernel.cuh"
#include "kernel_generation.h"
#include "launch_utils.h"

namespace skiplayers::cuda {
namespace {

constexpr const char* kOp = "skiplayers::cache_attention";

// Automatic split-K: enough blocks to fill the GPU (SplitTarget), but each split at least
// kMinKeysPerSplit keys of the actual cache length (effective_splits() runs on the device, where the
// lengths are). An explicit num_splits is used as given, capped at one split per kDecodeSplitBlock
// slots of capacity (more would be empty) and at kMaxSplits. The plan depends on host-known shapes
// only (no synchronisation), and the result does not depend on it.
constexpr int64_t kMinKeysPerSplit = 128;
constexpr int64_t kMaxSplits = 128;

struct SplitPlan {
  int64_t splits;
  int64_t min_keys;
};

// How many blocks fill the GPU, and how to round: the stable kernel asks for at least `blocks`
// (two per SM); the tensor-core kernel for at most `blocks` (those resident at once, whole waves:
// its blocks each hold up to 3 stages of K/V in flight, and a partial second wave of equal blocks
// would double the time of the first).
struct SplitTarget {
  int64_t blocks;
  bool at_most;
};

SplitPlan plan_splits(int64_t num_splits, int64_t blocks_per_split, int64_t capacity, SplitTarget target) {
  const int64_t by_blocks = std::max<int64_t>(1, ceil_div(capacity, kDecodeSplitBlock));  // more would be empty
  if (num_splits > 0) return SplitPlan{std::min({num_splits, by_blocks, kMaxSplits}), 1};
  blocks_per_split = std::max<int64_t>(blocks_per_split, 1);
  const int64_t want = blocks_per_split >= target.blocks ? 1
                       : target.at_most                  ? target.blocks / blocks_per_split
                                                         : ceil_div(target.blocks, blocks_per_split);
  const int64_t by_length = std::max<int64_t>(1, ceil_div(capacity, kMinKeysPerSplit));
  return SplitPlan{std::min({want, by_length, kMaxSplits}), kMinKeysPerSplit};
}

template <typename T, int D, int ROWS>
void launch_split(const DecodeParams<T>& p, int64_t kv_heads, cudaStream_t stream) {
  const dim3 grid(tiles_upper_bound(p.total_q, p.batch, p.group, ROWS), kv_heads, p.num_splits);
  decode_split_kernel<T, D, ROWS><<<grid, kDecodeThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_combine(const DecodeParams<T>& p, cudaStream_t stream) {
  const int64_t rows = p.total_q * p.heads;
  decode_combine_kernel<T, D><<<ceil_div(rows, kCombineWarps), kCombineWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Query rows per block of decode_split_kernel: all G heads of a token when G <= 8; 4 for fp32 at
// D = 256 (two 128-bit vectors per lane and row: 8 rows would not fit the registers).
template <typename T, int D>
constexpr bool split_kernel_takes_8_rows() {
  return !(std::is_same_v<T, float> && D == 256);
}

at::Tensor cache_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_cache_in, const at::Tensor& v_cache_in,
                                const at::Tensor& block_table, const at::Tensor& cu_seqlens_q,
                                const at::Tensor& cache_seqlens_in, const at::Tensor& q_pos_in,
                                const at::Tensor& pos_cache, const std::optional<at::Tensor>& q_tag_in,
                                const std::optional<at::Tensor>& tag_cache, int64_t rule, double scale,
                                int64_t num_splits) {
  const AttentionShape s = check_cache_attention(q_in, k_cache_in, v_cache_in, block_table, cu_seqlens_q,
                                                 cache_seqlens_in, q_pos_in, pos_cache, q_tag_in, tag_cache, rule,
                                                 num_splits);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const KernelGeneration generation = kernel_generation();
  check_head_dim(generation, s.head_dim, kOp);
  check_compute_capability(kOp);
  const int64_t capacity = slots_per_sequence(block_table, k_cache_in);
  const int64_t pool_slots = k_cache_in.size(0) * k_cache_in.size(1);
  TORCH_CHECK(s.batch < (1ll << 31) && s.num_queries < (1ll << 31) && capacity < (1ll << 31) &&
                  pool_slots < (1ll << 31),
              kOp, " (CUDA): at most 2^31 - 1 sequences, rows, slots per sequence and slots in the pool");
  TORCH_CHECK(s.kv_heads <= 65535, kOp, " (CUDA): at most 65535 KV heads, got ", s.kv_heads);
  const at::Tensor q = aligned16(dense_last_dim(q_in));
  const PoolSlots k_cache = aligned_pool_slots(k_cache_in), v_cache = aligned_pool_slots(v_cache_in);
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), lens = cache_seqlens_in.contiguous();
  const at::Tensor q_pos = q_pos_in.contiguous();
  const std::optional<at::Tensor> q_tag = optional_contiguous(q_tag_in);

  at::Tensor out = at::empty({s.num_queries, s.heads, s.head_dim}, q.options());
  if (s.empty()) return out;
  const int64_t group = s.heads / s.kv_heads;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  auto run = [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    dispatch_float(q.scalar_type(), kOp, [&](auto tag) {
      using T = typename decltype(tag)::type;
      // Which kernel: fp16 / bf16 under next on tensor cores, otherwise the FMA split kernel (its
      // instances: every dtype at D = 64 / 128, fp32 also at 96 / 256).
      constexpr bool kMmaBuilt = !std::is_same_v<T, float>;
      constexpr bool kSplitBuilt = std::is_same_v<T, float> || D == 64 || D == 128;
      const bool mma = kMmaBuilt && generation == KernelGeneration::kNext;
      TORCH_INTERNAL_ASSERT(mma || kSplitBuilt);
      int rows = kDecodeMmaRows;
      SplitTarget target{2 * sm_count(), /*at_most=*/false};
      if (mma) {
        if constexpr (kMmaBuilt) target = SplitTarget{decode_mma_blocks_per_sm<T, D>() * sm_count(), true};
      } else {
        rows = group > 4 && split_kernel_takes_8_rows<T, D>() ? 8 : 4;
      }
      const SplitPlan plan =
          plan_splits(num_splits, tiles_upper_bound(s.num_queries, s.batch, group, rows) * s.kv_heads, capacity, target);
      at::Tensor part_acc, part_ml;
      if (plan.splits > 1) {
        const at::TensorOptions f32 = q.options().dtype(at::kFloat);
        part_acc = at::empty({plan.splits, s.num_queries, s.heads, s.head_dim}, f32);
        part_ml = at::empty({2, plan.splits, s.num_queries, s.heads}, f32);
      }

      DecodeParams<T> p;
      p.q = reinterpret_cast<const T*>(q.data_ptr());
      p.q_token_stride = q.stride(0);
      p.q_head_stride = q.stride(1);
      p.k_cache = reinterpret_cast<const T*>(k_cache.pool.data_ptr());
      p.v_cache = reinterpret_cast<const T*>(v_cache.pool.data_ptr());
      p.k_slot_stride = k_cache.slot_stride;
      p.k_head_stride = k_cache.head_stride;
      p.v_slot_stride = v_cache.slot_stride;
      p.v_head_stride = v_cache.head_stride;
      p.block_table = block_table.data_ptr<int32_t>();
      p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
      p.cache_seqlens = lens.data_ptr<int32_t>();
      p.q_pos = q_pos.data_ptr<int32_t>();
      p.q_tag = optional_int_ptr(q_tag);
      p.pos_cache = pos_cache.data_ptr<int32_t>();  // contiguous (check_metadata_pages)
      p.tag_cache = optional_int_ptr(tag_cache);
      p.out = reinterpret_cast<T*>(out.data_ptr());
      p.part_acc = plan.splits > 1 ? part_acc.data_ptr<float>() : nullptr;
      p.part_m = plan.splits > 1 ? part_ml[0].data_ptr<float>() : nullptr;
      p.part_l = plan.splits > 1 ? part_ml[1].data_ptr<float>() : nullptr;
      p.batch = static_cast<int32_t>(s.batch);
      p.heads = static_cast<int32_t>(s.heads);
      p.group = static_cast<int32_t>(group);
      p.max_pages = static_cast<int32_t>(block_table.size(1));
      p.page_size = static_cast<int32_t>(k_cache_in.size(1));
      p.capacity = static_cast<int32_t>(capacity);
      p.pool_slots = static_cast<int32_t>(pool_slots);
      p.total_q = s.num_queries;
      p.rule = rule;
      p.scale_log2 = static_cast<float>(scale) * kLog2e;
      p.num_splits = static_cast<int32_t>(plan.splits);
      p.min_keys_per_split = static_cast<int32_t>(plan.min_keys);

      if (mma) {
        if constexpr (kMmaBuilt) launch_decode_mma<T, D>(p, s.kv_heads, stream);
      } else if constexpr (kSplitBuilt) {
        if (rows == 8) {
          if constexpr (split_kernel_takes_8_rows<T, D>()) launch_split<T, D, 8>(p, s.kv_heads, stream);
        } else {
          launch_split<T, D, 4>(p, s.kv_heads, stream);
        }
      }
      if (p.num_splits > 1) launch_combine<T, D>(p, stream);
    });
  };
  if (generation == KernelGeneration::kStable) dispatch_stable_head_dim(s.head_dim, kOp, run);
  else dispatch_next_head_dim(s.head_dim, kOp, run);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(skiplayers, CUDA, m) { m.impl("cache_attention", &cache_attention_cuda); }

}  // namespace skiplayers::cuda
