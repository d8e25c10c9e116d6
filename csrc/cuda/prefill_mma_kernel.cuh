// Prefill attention (skiplayers::varlen_attention) for fp16 / bf16 on tensor cores (sm_80+):
// a flash-attention-2 style kernel over packed ragged batches.
//
// Block: 4 warps, a tile of kRows = 64 query rows of one sequence and one KV head (rows flatten
// (token, query head of the group), ragged.h), 16 rows per warp. Key blocks of kKeys = 64:
//
//   for each key block of the sequence:
//     summary of its keys' (pos, tag) (visibility.h)     -> skip it if no query of the tile can see
//                                                           any of its keys: K/V never loaded
//     K, V -> shared memory (cp.async, zero-filled past the end)
//     S = Q K^T            mma.m16n8k16, Q fragments held in registers for the whole tile
//     mask                 the predicate per element, unless the summaries prove the block fully
//                          visible (plain causal, block entirely in the past)
//     online softmax       base 2 (scores scaled by scale * log2 e), fp32 row max / sum
//     O += P V             P re-packed from the S accumulators as the A operand, V via ldmatrix.trans
//
// Shared memory rows are padded by 16 bytes so ldmatrix reads are free of bank conflicts.
#pragma once

#include "mma_sm80.cuh"
#include "prefill_common.cuh"

namespace skiplayers::cuda {

constexpr int kPrefillMmaThreads = 128;
constexpr int kPrefillMmaRows = 64;
constexpr int kPrefillMmaKeys = 64;

__device__ __forceinline__ uint32_t load_b32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

template <typename T, int D>
__global__ void __launch_bounds__(kPrefillMmaThreads) prefill_mma_kernel(const PrefillParams<T> p) {
  constexpr int kStride = D + 8;  // padded shared-memory row (elements)
  constexpr int kN = kPrefillMmaKeys;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert(D % 32 == 0, "head_dim must be a multiple of 32");
  __shared__ alignas(16) T k_tile[kN * kStride];
  __shared__ alignas(16) T v_tile[kN * kStride];
  __shared__ int32_t key_pos[kN];
  __shared__ int32_t key_tag[kN];
  __shared__ BlockSummary warp_sums[kPrefillMmaThreads / 32];

  PrefillTile tile;
  if (!prefill_tile(p, kPrefillMmaRows, &tile)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;

  // This thread's two rows of the mma fragments: warp * 16 + g and + 8.
  const auto [ra, rb, pos_a, pos_b, tag_a, tag_b] = fragment_rows(p, tile, warp, g);

  // Q as A fragments, straight from global memory (read once per tile).
  uint32_t qf[D / 16][4];
  {
    const T* qa = p.q + ra.token * p.q_token_stride + ra.head * p.q_head_stride + 2 * t;
    const T* qb = p.q + rb.token * p.q_token_stride + rb.head * p.q_head_stride + 2 * t;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qf[kk][0] = ra.valid ? load_b32(qa + kk * 16) : 0u;
      qf[kk][1] = rb.valid ? load_b32(qb + kk * 16) : 0u;
      qf[kk][2] = ra.valid ? load_b32(qa + kk * 16 + 8) : 0u;
      qf[kk][3] = rb.valid ? load_b32(qb + kk * 16 + 8) : 0u;
    }
  }

  BlockSummary q_sum = block_summary_empty();
  if (ra.valid) block_summary_add(q_sum, pos_a, tag_a);
  if (rb.valid) block_summary_add(q_sum, pos_b, tag_b);
  q_sum = block_summary_reduce<kPrefillMmaThreads / 32>(q_sum, warp_sums);

  float o[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;  // l: this thread's columns only

  const int32_t* kpos_seq = p.k_pos + tile.key_begin;
  const int32_t* ktag_seq = p.k_tag ? p.k_tag + tile.key_begin : nullptr;
  const T* k_seq = p.k + tile.key_begin * p.k_token_stride + tile.kv_head * p.k_head_stride;
  const T* v_seq = p.v + tile.key_begin * p.v_token_stride + tile.kv_head * p.v_head_stride;

  for (int64_t kb = 0; kb < tile.keys; kb += kN) {
    const int n = static_cast<int>(tile.keys - kb < kN ? tile.keys - kb : kN);
    // Every warp computes the same summary, so the skip decision is uniform across the block.
    const BlockSummary k_sum = warp_key_summary(kpos_seq + kb, ktag_seq ? ktag_seq + kb : nullptr, n, lane);
    if (!block_may_be_visible(p.rule, q_sum, k_sum)) continue;
    const bool full = n == kN && block_fully_visible(p.rule, q_sum, k_sum);

    __syncthreads();  // all warps are done reading the previous block's tiles
    for (int c = tid; c < kN * kChunks; c += kPrefillMmaThreads) {
      const int key = c / kChunks, ch = c % kChunks;
      const bool in = key < n;
      const int64_t row = kb + (in ? key : 0);
      cp_async_16(&k_tile[key * kStride + ch * 8], k_seq + row * p.k_token_stride + ch * 8, in ? 16 : 0);
      cp_async_16(&v_tile[key * kStride + ch * 8], v_seq + row * p.v_token_stride + ch * 8, in ? 16 : 0);
    }
    if (tid < kN) {
      key_pos[tid] = tid < n ? kpos_seq[kb + tid] : 0;
      key_tag[tid] = (tid < n && ktag_seq) ? ktag_seq[kb + tid] : 0;
    }
    cp_async_wait_all();
    __syncthreads();

    // S = Q K^T: 8 column tiles of 8 keys.
    float s[kN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kk2 = 0; kk2 < D / 32; ++kk2) {
        uint32_t bf[4];
        ldmatrix_x4(bf, &k_tile[(nt * 8 + (lane & 7)) * kStride + kk2 * 32 + (lane >> 3) * 8]);
        mma_16816<T>(s[nt], qf[2 * kk2], bf[0], bf[1]);
        mma_16816<T>(s[nt], qf[2 * kk2 + 1], bf[2], bf[3]);
      }
    }

    // Scale, mask, row maxima (a row's 64 scores live in the 4 lanes of a quad).
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = nt * 8 + 2 * t + (e & 1);
        float x = s[nt][e] * p.scale_log2;
        if (!full) {
          const bool visible = key < n && (e < 2 ? ra.valid && key_visible(p.rule, pos_a, tag_a, key_pos[key], key_tag[key])
                                                 : rb.valid && key_visible(p.rule, pos_b, tag_b, key_pos[key], key_tag[key]));
          x = visible ? x : -INFINITY;
        }
        s[nt][e] = x;
        if (e < 2) mx_a = fmaxf(mx_a, x); else mx_b = fmaxf(mx_b, x);
      }
    }
    mx_a = group_max<4>(mx_a);
    mx_b = group_max<4>(mx_b);

    // Online softmax. A row that has seen no visible key keeps m = -inf; shifting by 0 then keeps
    // its probabilities exactly 0 (and never computes -inf - -inf).
    const float new_a = fmaxf(m_a, mx_a), new_b = fmaxf(m_b, mx_b);
    const float shift_a = new_a == -INFINITY ? 0.f : new_a, shift_b = new_b == -INFINITY ? 0.f : new_b;
    const float alpha_a = exp2f(m_a - shift_a), alpha_b = exp2f(m_b - shift_b);
    m_a = new_a;
    m_b = new_b;
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - shift_a);
      s[nt][1] = exp2f(s[nt][1] - shift_a);
      s[nt][2] = exp2f(s[nt][2] - shift_b);
      s[nt][3] = exp2f(s[nt][3] - shift_b);
      sum_a += s[nt][0] + s[nt][1];
      sum_b += s[nt][2] + s[nt][3];
    }
    l_a = l_a * alpha_a + sum_a;
    l_b = l_b * alpha_b + sum_b;
    scale_accumulator_rows(o, alpha_a, alpha_b);

    // O += P V, 16 keys per k-step; P's A fragment is two adjacent S column tiles.
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) mma_pv_16_keys<T, D>(o, s[2 * kk], s[2 * kk + 1], &v_tile[kk * 16 * kStride], kStride, lane);
  }

  l_a = group_sum<4>(l_a);
  l_b = group_sum<4>(l_b);
  const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f;  // no visible key: zeros
  const float inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
  T* out_a = p.out + (ra.token * p.heads + ra.head) * D + 2 * t;
  T* out_b = p.out + (rb.token * p.heads + rb.head) * D + 2 * t;
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) {
    if (ra.valid) *reinterpret_cast<uint32_t*>(out_a + nd * 8) = pack2<T>(o[nd][0] * inv_a, o[nd][1] * inv_a);
    if (rb.valid) *reinterpret_cast<uint32_t*>(out_b + nd * 8) = pack2<T>(o[nd][2] * inv_b, o[nd][3] * inv_b);
  }
}

}  // namespace skiplayers::cuda
