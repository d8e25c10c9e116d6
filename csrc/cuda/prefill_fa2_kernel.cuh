// Prefill attention (skiplayers::varlen_attention), next generation, fp16 / bf16 on sm_80+ with
// mma.sync: a FlashAttention-2-class kernel over packed ragged batches. Same semantics as the
// stable kernel (prefill_mma_kernel.cuh): tiles of (token, query head of the group) rows, key
// blocks skipped from their (pos, tag) summaries before K/V are loaded, the predicate evaluated
// per element only on blocks not proven fully visible, rows past the sequence zero-filled and never
// written, rows with no visible key written as zeros, metadata checked on the device.
//
// Tiles (Fa2Config): kWarps warps of 16 query rows each; key blocks of kKeys keys.
//   D = 64, 96, 128: 8 warps x 16 = 128 rows, 64 keys, Q fragments held in registers
//                    (D / 16 x 4 b32) for the whole tile, O accumulators D / 8 x 4 fp32.
//   D = 256:         4 warps x 16 = 64 rows, 32 keys, Q fragments read from shared memory per
//                    k-step (ldmatrix): O alone is 128 fp32 registers per thread, Q in registers
//                    would add 64 and spill; 32 keys keep S at 16 registers and shared memory at
//                    101 KB (Q 33 KB + 2 stages of K and V, 67 KB).
//
// Pipeline (two stages, cp.async):
//   prologue  Q tile -> shared, K/V (+ pos, tag) of the first visible block -> stage 0; wait;
//             Q -> registers (D <= 128: Q used stage 1 as its landing buffer)
//   loop      find the next visible block (KeyBlockCursor), issue its copies into the other stage,
//             commit; cp.async.wait_group 1 (this block's copies done, the next one's in flight);
//             barrier; S = Q K^T; mask (partial blocks only); online softmax; O += P V; barrier
//             (the stage may be overwritten by the copies issued next)
//
// Shared memory: rows padded to D + 8 elements (16 bytes), so the 8 row addresses of an ldmatrix
// phase hit distinct 16-byte bank groups for every D here (row pitch 2D + 16 bytes = 4 words mod 32
// for D = 64, 128, 256 and 20 words mod 32 for D = 96: 8 distinct multiples of 4 words). Dynamic,
// with the opt-in attribute above 48 KB (the launcher).
//
// Softmax: base 2 with the scale folded into one FFMA per score and MUFU.EX2 (softmax_sm80.cuh).
// Templated on the rule class (prefill_key_blocks.cuh): the causal instance evaluates only
// key < n && k_pos <= q_pos on partial blocks and nothing on full ones.
#pragma once

#include "mma_sm80.cuh"
#include "prefill_common.cuh"
#include "prefill_key_blocks.cuh"
#include "softmax_sm80.cuh"

namespace skiplayers::cuda {

template <int D>
struct Fa2Config {
  static_assert(D == 64 || D == 96 || D == 128 || D == 256, "head_dim must be 64, 96, 128 or 256");
  static constexpr int kWarps = D == 256 ? 4 : 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps;
  static constexpr int kKeys = D == 256 ? 32 : 64;
  static constexpr bool kQInRegisters = D <= 128;
  // Unrolling of the 32-dim steps of S = Q K^T: full where Q is in registers (the fragments are
  // indexed by the step); 2 for D = 256, where the full unroll let ptxas hoist the Q and K fragment
  // loads of all 8 steps and spill.
  static constexpr int kQKUnroll = kQInRegisters ? D / 32 : 2;
  static constexpr int kStride = D + 8;               // padded shared row, elements
  static constexpr int kChunks = D / 8;               // 16-byte chunks per row
  using Cursor = KeyBlockCursor<kRuleCausal, kKeys, kWarps>;  // only its sizes are used here
  // Shared memory, in 16-bit elements: [stage 0: K, V][stage 1: K, V] then, unless Q stays in
  // registers, the Q tile (with Q in registers the tile lands in stage 1, which is free until the
  // loop's first prefetch).
  static constexpr int kStageElems = 2 * kKeys * kStride;
  static constexpr int kQElems = kRows * kStride;
  static_assert(!kQInRegisters || kQElems <= kStageElems, "Q must fit in stage 1");
  static constexpr int kTileElems = 2 * kStageElems + (kQInRegisters ? 0 : kQElems);
  static constexpr size_t kSharedBytes = size_t{2} * kTileElems + sizeof(int64_t) * kRows +
                                         sizeof(int32_t) * 4 * kKeys + sizeof(uint32_t) * 2 * Cursor::kWords;
  // cuobjdump (tests/test_cuda_static.py) sees only static shared memory: the dynamic part is bounded
  // here, under the sm_80 per-block opt-in maximum (163 KB) with room for the static few hundred bytes.
  static_assert(kSharedBytes <= 160 * 1024, "dynamic shared memory over the sm_80 per-block maximum");
  static_assert(kThreads == 4 * kKeys && kRows % (kThreads / 4) == 0 && kChunks % 4 == 0,
                "copies: 4 threads per K/V row, one row each; Q rows in whole passes");
  static_assert(D % 32 == 0 && (D / 8) % 2 == 0, "k-steps of 32 dims (S) and pairs of 8-column tiles (P V)");
};

template <typename T, int D, int kRuleClass>
__global__ void __launch_bounds__(Fa2Config<D>::kThreads, 1)
    prefill_fa2_kernel(const PrefillParams<T> p) {
  using Cfg = Fa2Config<D>;
  constexpr int kWarps = Cfg::kWarps, kThreads = Cfg::kThreads, kRows = Cfg::kRows, kN = Cfg::kKeys;
  constexpr int kStride = Cfg::kStride, kChunks = Cfg::kChunks;
  using Cursor = KeyBlockCursor<kRuleClass, kN, kWarps>;

  extern __shared__ __align__(16) unsigned char fa2_smem[];
  T* const kv_s = reinterpret_cast<T*>(fa2_smem);  // [2 stages][K, V][kN][kStride]
  T* const q_s = Cfg::kQInRegisters ? kv_s + Cfg::kStageElems : kv_s + 2 * Cfg::kStageElems;
  // Output offset of each tile row, (token * heads + head) * D, or -1 past the sequence: kept here
  // rather than in registers across the key loop (where they would spill).
  int64_t* const out_off_s = reinterpret_cast<int64_t*>(kv_s + Cfg::kTileElems);  // [kRows]
  int32_t* const kpos_s = reinterpret_cast<int32_t*>(out_off_s + kRows);         // [2][kN]
  int32_t* const ktag_s = kpos_s + 2 * kN;                                       // [2][kN]
  uint32_t* const bits_s = reinterpret_cast<uint32_t*>(ktag_s + 2 * kN);        // visible, full
  __shared__ BlockSummary warp_sums[kWarps];
  __shared__ BlockSummary q_sum_s;

  PrefillTile tile;
  if (!prefill_tile(p, kRows, &tile)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;

  // This thread's two rows of the mma fragments: warp * 16 + g (a) and + 8 (b).
  const auto [ra, rb, pos_a, pos_b, tag_a, tag_b] = fragment_rows(p, tile, warp, g);

  const int32_t* kpos_seq = p.k_pos + tile.key_begin;
  const int32_t* ktag_seq = p.k_tag ? p.k_tag + tile.key_begin : nullptr;
  const T* k_seq = p.k + tile.key_begin * p.k_token_stride + tile.kv_head * p.k_head_stride;
  const T* v_seq = p.v + tile.key_begin * p.v_token_stride + tile.kv_head * p.v_head_stride;

  // Copies: 4 threads per row, thread c4 = tid % 4 copying the row's 16-byte chunks c4 + 4j, so one
  // instruction of a warp reads 64 contiguous bytes of each of 8 rows (whole sectors), and a row
  // costs one 64-bit address (the chunks are immediate offsets).
  const int copy_row = tid / 4, c4 = tid % 4;

  // Q tile -> shared memory; rows past the sequence are zero-filled.
#pragma unroll
  for (int i = 0; i < kRows / (kThreads / 4); ++i) {
    const int r = copy_row + i * (kThreads / 4);
    const QueryRow qr = query_row(tile.first_token, tile.rows_in_seq, tile.row0 + r, p.group, tile.kv_head);
    const T* src = qr.valid ? p.q + qr.token * p.q_token_stride + qr.head * p.q_head_stride : p.q;
    if (c4 == 0) out_off_s[r] = qr.valid ? (qr.token * p.heads + qr.head) * D : int64_t{-1};
#pragma unroll
    for (int j = 0; j < kChunks / 4; ++j)
      cp_async_16(q_s + r * kStride + (c4 + 4 * j) * 8, src + (c4 + 4 * j) * 8, qr.valid ? 16 : 0);
  }

  // K, V, key positions and tags of key block `block` -> stage `stage`; keys past the sequence are
  // zero-filled (their scores are masked by key < n).
  auto issue_block = [&](int stage, int64_t block) {
    const int64_t kb = block * kN;
    const int n = static_cast<int>(tile.keys - kb < kN ? tile.keys - kb : kN);
    T* const k_dst = kv_s + stage * Cfg::kStageElems + copy_row * kStride;  // kN rows, one per 4 threads
    T* const v_dst = k_dst + kN * kStride;
    const bool in = copy_row < n;
    const int64_t row = kb + (in ? copy_row : 0);
    const T* const k_src = k_seq + row * p.k_token_stride;
    const T* const v_src = v_seq + row * p.v_token_stride;
#pragma unroll
    for (int j = 0; j < kChunks / 4; ++j) {
      const int ch = c4 + 4 * j;
      cp_async_16(k_dst + ch * 8, k_src + ch * 8, in ? 16 : 0);
      cp_async_16(v_dst + ch * 8, v_src + ch * 8, in ? 16 : 0);
    }
    if (tid < kN) {
      const bool in = tid < n;
      cp_async_4(kpos_s + stage * kN + tid, kpos_seq + kb + (in ? tid : 0), in ? 4 : 0);
      if constexpr (kRuleClass != kRuleCausal) {
        const bool has_tag = in && ktag_seq != nullptr;
        cp_async_4(ktag_s + stage * kN + tid, has_tag ? ktag_seq + kb + tid : kpos_seq + kb, has_tag ? 4 : 0);
      }
    }
  };

  // The tile's summary (valid rows only) decides which key blocks are visited.
  BlockSummary q_sum = block_summary_empty();
  if (ra.valid) block_summary_add(q_sum, pos_a, tag_a);
  if (rb.valid) block_summary_add(q_sum, pos_b, tag_b);
  q_sum = block_summary_reduce<kWarps>(q_sum, warp_sums);
  if (tid == 0) q_sum_s = q_sum;  // visible to all at the cursor's first refill (it starts with a barrier)
  Cursor cursor(bits_s, bits_s + Cursor::kWords, kpos_seq, ktag_seq, tile.keys, p.rule, &q_sum_s);

  bool cur_full = false;
  int64_t cur = cursor.next(0, &cur_full);
  if (cur < cursor.blocks) issue_block(0, cur);
  cp_async_commit_group();  // group: Q tile + first block
  cp_async_wait_group<0>();
  __syncthreads();
  // A softmax scale <= 0 (the op takes any finite scale; softmax_sm80.cuh needs c > 0): for a
  // negative one, Q's sign bits are flipped (exact) and the scores scaled by |c|; a zero one zeroes
  // Q, so every visible score is 0 whatever c > 0 scales it by. Each thread rewrites the chunks it
  // copied; the barrier publishes them before the fragments are read.
  if (p.scale_log2 <= 0.f) {
    const uint32_t keep = p.scale_log2 < 0.f ? 0xffffffffu : 0u, flip = p.scale_log2 < 0.f ? 0x80008000u : 0u;
#pragma unroll
    for (int i = 0; i < kRows / (kThreads / 4); ++i) {
      const int r = copy_row + i * (kThreads / 4);
#pragma unroll
      for (int j = 0; j < kChunks / 4; ++j) {
        uint4* const chunk = reinterpret_cast<uint4*>(q_s + r * kStride + (c4 + 4 * j) * 8);
        uint4 v = *chunk;
        v.x = (v.x & keep) ^ flip;
        v.y = (v.y & keep) ^ flip;
        v.z = (v.z & keep) ^ flip;
        v.w = (v.w & keep) ^ flip;
        *chunk = v;
      }
    }
    __syncthreads();
  }

  // Q as A fragments: lanes 0-15 address rows 0-15 of the warp at column k0, lanes 16-31 the same
  // rows at k0 + 8, so ldmatrix.x4 returns a0..a3 of mma_sm80.cuh.
  const T* const q_frag_addr = q_s + (warp * 16 + (lane & 15)) * kStride + (lane >> 4) * 8;
  uint32_t qf[Cfg::kQInRegisters ? D / 16 : 1][4];
  if constexpr (Cfg::kQInRegisters) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], q_frag_addr + kk * 16);
    __syncthreads();  // Q's landing buffer (stage 1) is read by all warps before it is refilled
  }

  float o[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;  // l: this thread's columns only
  const float c = p.scale_log2 < 0.f ? -p.scale_log2 : (p.scale_log2 == 0.f ? 1.f : p.scale_log2);  // > 0 (above)
  int stage = 0;

  while (cur < cursor.blocks) {
    bool nxt_full = false;
    const int64_t nxt = cursor.next(cur + 1, &nxt_full);
    if (nxt < cursor.blocks) issue_block(stage ^ 1, nxt);
    cp_async_commit_group();
    cp_async_wait_group<1>();  // this block's group is complete, the next one stays in flight
    __syncthreads();

    const T* const k_tile = kv_s + stage * Cfg::kStageElems;
    const T* const v_tile = k_tile + kN * kStride;

    // S = Q K^T, 16 rows x kN keys per warp; K as B fragments (ldmatrix: matrix i = 8 keys x dims
    // k0 + 8i .. k0 + 8i + 7, i.e. b0 b1 of k-step 2 kk2 and b0 b1 of k-step 2 kk2 + 1).
    float s[kN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll(Cfg::kQKUnroll)
    for (int kk2 = 0; kk2 < D / 32; ++kk2) {
      uint32_t qa[4], qb[4];
      if constexpr (Cfg::kQInRegisters) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          qa[i] = qf[2 * kk2][i];
          qb[i] = qf[2 * kk2 + 1][i];
        }
      } else {
        ldmatrix_x4(qa, q_frag_addr + kk2 * 32);
        ldmatrix_x4(qb, q_frag_addr + kk2 * 32 + 16);
      }
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
        uint32_t bf[4];
        ldmatrix_x4(bf, k_tile + (nt * 8 + (lane & 7)) * kStride + kk2 * 32 + (lane >> 3) * 8);
        mma_16816<T>(s[nt], qa, bf[0], bf[1]);
        mma_16816<T>(s[nt], qb, bf[2], bf[3]);
      }
    }

    // Mask, partial blocks only (a uniform branch). Thread columns: nt * 8 + 2t + {0, 1}.
    if (!cur_full) {
      const int n = static_cast<int>(tile.keys - cur * kN < kN ? tile.keys - cur * kN : kN);
      const int32_t* kp = kpos_s + stage * kN;
      const int32_t* kt = ktag_s + stage * kN;
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int key = nt * 8 + 2 * t + h;
          const int32_t k_pos = kp[key];
          bool vis_a, vis_b;
          if constexpr (kRuleClass == kRuleCausal) {
            vis_a = key < n && k_pos <= pos_a;
            vis_b = key < n && k_pos <= pos_b;
          } else {
            const int32_t k_tag = kt[key];
            vis_a = key < n && key_visible(p.rule, pos_a, tag_a, k_pos, k_tag);
            vis_b = key < n && key_visible(p.rule, pos_b, tag_b, k_pos, k_tag);
          }
          s[nt][h] = vis_a ? s[nt][h] : -INFINITY;
          s[nt][2 + h] = vis_b ? s[nt][2 + h] : -INFINITY;
        }
      }
    }

    // Online softmax: raw row maxima (a row's kN scores live in the 4 lanes of a quad), scaled once.
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
      mx_a = fmaxf(mx_a, fmaxf(s[nt][0], s[nt][1]));
      mx_b = fmaxf(mx_b, fmaxf(s[nt][2], s[nt][3]));
    }
    mx_a = group_max<4>(mx_a);
    mx_b = group_max<4>(mx_b);
    float neg_a, neg_b;
    const float alpha_a = softmax_update_max(m_a, mx_a, c, neg_a);
    const float alpha_b = softmax_update_max(m_b, mx_b, c, neg_b);
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
      s[nt][0] = fast_exp2(fmaf(s[nt][0], c, neg_a));
      s[nt][1] = fast_exp2(fmaf(s[nt][1], c, neg_a));
      s[nt][2] = fast_exp2(fmaf(s[nt][2], c, neg_b));
      s[nt][3] = fast_exp2(fmaf(s[nt][3], c, neg_b));
      sum_a += s[nt][0] + s[nt][1];
      sum_b += s[nt][2] + s[nt][3];
    }
    l_a = l_a * alpha_a + sum_a;
    l_b = l_b * alpha_b + sum_b;
    scale_accumulator_rows(o, alpha_a, alpha_b);

    // O += P V, 16 keys per k-step; P's A fragment is two adjacent S column tiles (mma_sm80.cuh).
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) mma_pv_16_keys<T, D>(o, s[2 * kk], s[2 * kk + 1], v_tile + kk * 16 * kStride, kStride, lane);

    __syncthreads();  // every warp is done with this stage before the next iteration refills it
    cur = nxt;
    cur_full = nxt_full;
    stage ^= 1;
  }

  l_a = group_sum<4>(l_a);
  l_b = group_sum<4>(l_b);
  const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f;  // no visible key: zeros
  const float inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
  const int64_t off_a = out_off_s[warp * 16 + g], off_b = out_off_s[warp * 16 + g + 8];
  T* out_a = p.out + off_a + 2 * t;
  T* out_b = p.out + off_b + 2 * t;
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) {
    if (off_a >= 0) *reinterpret_cast<uint32_t*>(out_a + nd * 8) = pack2<T>(o[nd][0] * inv_a, o[nd][1] * inv_a);
    if (off_b >= 0) *reinterpret_cast<uint32_t*>(out_b + nd * 8) = pack2<T>(o[nd][2] * inv_b, o[nd][3] * inv_b);
  }
}

}  // namespace skiplayers::cuda
