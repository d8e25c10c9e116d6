// Decode attention on tensor cores (the next generation's skiplayers::cache_attention for fp16 /
// bf16, sm_80+): split-K over paged caches with a cp.async pipeline of key stages, the GQA query
// heads of a KV head as the rows of one mma.m16n8k16 tile.
//
// Block: 4 warps, one (query tile, KV head, split) as the stable kernel (decode_common.cuh):
//   rows    kDecodeMmaRows = 16 rows of one sequence and one KV head, row r = (token r / G, query
//           head kv_head * G + r % G) (ragged.h): a decode step of G <= 16 heads is one tile (rows
//           past the sequence's G * tokens are zeros and never written), so each K/V row is read
//           once for all the heads that share it, and S = Q K^T, O += P V run on tensor cores.
//   stages  the split's keys in stages of kKeys = 64 (split boundaries are multiples of 64, so only
//           a split's last stage is partial); STAGES stage buffers of K and V in shared memory
//           (3 for D <= 128 where the GPU's shared memory per block takes them, else 2; decode_mma.cu
//           picks), filled by 16-byte cp.async: while a stage is computed,
//           the next kStages - 1 are in flight.
//   warps   warp w takes keys 16w .. 16w + 15 of every stage: S (16 rows x 16 keys) = Q K^T over D / 16
//           k-steps, the mask, its own online softmax (m, l, O: 16 x D fp32 in mma accumulators),
//           O += P V with P (two S column tiles re-packed to 16 bits) as the A operand. A warp whose
//           16 keys no row sees skips the stage. At the end the 4 warps' (m, l, O) are merged in
//           shared memory (the stage buffers, drained), and the block writes its output (one
//           split) or its partial (acc, m, l) for decode_combine_kernel.
//   keys    thread t < 64 resolves key t of a stage (decode_common.cuh key_page / key_slot): the
//           block table entry, the flat slot, pos / tag, and the bit mask of the tile's rows that see
//           the key (visibility.h; a key the causal rule proves visible to every row costs one
//           comparison). The resolution is software-pipelined in registers over three stages, each
//           step's loads landing while a stage is computed: stage i + S + 1's block table entry, stage
//           i + S's pos / tag, stage i + S - 1's mask, published to shared memory (with its slot) for
//           the copies and the compute of all warps. The prologue issues the first stages' block
//           table loads, then their pos / tag loads, before the query rows are loaded, so a block's
//           start costs about two dependent memory latencies before its first copies.
//   skip    a key no row sees is not loaded: its 16-byte copies are zero-fill (cp.async src-size
//           0: nothing read), so K / V bytes of invisible keys never leave memory, and its scores are
//           masked (P = 0, selected, never -inf * 0).
//   softmax base 2: score x = s * |scale log2 e| (Q's sign flipped, exactly, when the scale is
//           negative), the scale folded into one FMA per score: p = exp2(fma(s, c, -m)), with
//           ex2.approx.ftz; the row max is kept in scaled units, and fp32 throughout.
//
// One barrier a stage. Iteration i:
//   publish the mask / slot of stage i + S - 1 (registers -> meta[(i + S - 1) % (S + 1)])
//   cp.async.wait_group S - 2; __syncthreads   stage i landed; everyone is done with stage i - 1
//                                               (its buffer is free); the published meta is visible
//   cp.async stage i + S - 1 -> buffer (i - 1) % S, commit (an empty group past the last stage)
//   block table load of stage i + S + 1, pos / tag loads of stage i + S
//   compute stage i
// meta has S + 1 slots so the one published before the barrier is neither the one still being read
// for stage i - 1's compute nor the one read by the copies of iteration i - 1.
#pragma once

#include "decode_common.cuh"
#include "mma_sm80.cuh"
#include "softmax_sm80.cuh"

namespace skiplayers::cuda {

constexpr int kDecodeMmaThreads = 128;
constexpr int kDecodeMmaWarps = kDecodeMmaThreads / 32;
constexpr int kDecodeMmaKeys = 64;  // keys of a stage: 16 per warp
static_assert(kDecodeMmaKeys == 16 * kDecodeMmaWarps, "a warp's keys of a stage are one 16-key k-step of P V");
static_assert(kDecodeSplitBlock % kDecodeMmaKeys == 0, "only a split's last stage may be partial");
static_assert(kDecodeMmaRows == 16, "the rows are one mma.m16n8k16 row tile");

namespace decode_mma {

// Shared memory of one block (dynamic; bytes). Rows of K, V, Q are padded by 16 bytes so that the
// ldmatrix row addresses of 8 consecutive rows fall in distinct bank groups.
template <int D, int STAGES>
struct Shape {
  static_assert(STAGES >= 2, "the pipeline keeps STAGES - 1 stages in flight while one is computed");
  static constexpr int kStages = STAGES;
  static constexpr int kMeta = kStages + 1;  // slots of the published key metadata (see above)
  static constexpr int kStride = D + 8;      // elements of a padded 16-bit row
  static constexpr int kChunks = D / 8;      // 16-byte chunks of a row
  static constexpr bool kQInRegisters = D <= 128;  // D = 256: Q fragments re-read from shared memory
  static constexpr int kTileBytes = kDecodeMmaKeys * kStride * 2;
  static constexpr int kK = 0;
  static constexpr int kV = kK + kStages * kTileBytes;
  static constexpr int kQ = kV + kStages * kTileBytes;
  static constexpr int kSlot = kQ + kDecodeMmaRows * kStride * 2;   // int32 [kMeta][kKeys]: -1 = not loaded
  static constexpr int kMask = kSlot + kMeta * kDecodeMmaKeys * 4;  // uint32 [kMeta][kKeys]: rows that see it
  static constexpr int kQPos = kMask + kMeta * kDecodeMmaKeys * 4;  // int32 [16]
  static constexpr int kQTag = kQPos + kDecodeMmaRows * 4;           // int32 [16]
  static constexpr int kBytes = kQTag + kDecodeMmaRows * 4;
  // Epilogue, over the drained stage buffers: O of every warp, fp32 [warps][16][kOStride], then m, l.
  static constexpr int kOStride = D + 8;  // floats: float2 stores of a half warp hit 32 distinct banks
  static constexpr int kOBytes = kDecodeMmaWarps * kDecodeMmaRows * kOStride * 4;
  static constexpr int kM = kOBytes;
  static constexpr int kL = kM + kDecodeMmaWarps * kDecodeMmaRows * 4;
  static_assert(kL + kDecodeMmaWarps * kDecodeMmaRows * 4 <= kQ, "the epilogue fits the stage buffers");
  static_assert(D % 32 == 0 && D <= 256, "S = Q K^T takes 32 columns of K per ldmatrix.x4");
  static_assert(kBytes <= 163 * 1024, "fits an sm_80 block's shared memory");
};

}  // namespace decode_mma

// grid: (query tiles upper bound for kDecodeMmaRows, kv_heads, num_splits); dynamic shared memory
// decode_mma::Shape<D, STAGES>::kBytes.
template <typename T, int D, int STAGES>
__global__ void __launch_bounds__(kDecodeMmaThreads) decode_mma_kernel(const DecodeParams<T> p) {
  using namespace decode_mma;
  using S = Shape<D, STAGES>;
  constexpr int kStages = S::kStages, kMeta = S::kMeta, kStride = S::kStride, kKeys = kDecodeMmaKeys;
  extern __shared__ __align__(16) unsigned char smem[];
  T* const k_s = reinterpret_cast<T*>(smem + S::kK);  // [kStages][kKeys][kStride]
  T* const v_s = reinterpret_cast<T*>(smem + S::kV);
  T* const q_s = reinterpret_cast<T*>(smem + S::kQ);  // [16][kStride]
  int32_t* const meta_slot = reinterpret_cast<int32_t*>(smem + S::kSlot);
  uint32_t* const meta_mask = reinterpret_cast<uint32_t*>(smem + S::kMask);
  int32_t* const row_pos = reinterpret_cast<int32_t*>(smem + S::kQPos);
  int32_t* const row_tag = reinterpret_cast<int32_t*>(smem + S::kQTag);

  const TileCoord tc = locate_tile(p.cu_seqlens_q, p.batch, p.group, kDecodeMmaRows, blockIdx.x, p.total_q);
  if (tc.seq < 0) return;
  const int32_t kv_head = blockIdx.y;
  const int32_t split = blockIdx.z;
  DecodeWork work;
  if (!decode_work(p, tc, kDecodeMmaRows, split, &work)) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates (mma_sm80.cuh)
  const int64_t rows_left = work.rows_in_seq - work.row0;
  const int valid_rows = static_cast<int>(rows_left < kDecodeMmaRows ? rows_left : kDecodeMmaRows);  // >= 1
  const uint32_t valid_mask = (1u << valid_rows) - 1u;
  const int32_t key_begin = static_cast<int32_t>(work.key_begin);  // < capacity < 2^31
  const int32_t key_end = static_cast<int32_t>(work.key_end);
  // int64: a split of nearly 2^31 keys (num_splits = 1, the largest capacity) must not wrap.
  const int n_stages = static_cast<int>((int64_t{key_end} - key_begin + kKeys - 1) / kKeys);

  // ---- key resolution (threads t < kKeys; key t of a stage), software-pipelined ---------------
  const bool resolver = tid < kKeys;
  auto key_of = [&](int stage) { return key_begin + stage * kKeys + tid; };
  // (stage < n_stages first: key_of() of a later stage could pass 2^31 - 1 for the longest caches)
  auto in_range = [&](int stage) { return resolver && stage < n_stages && key_of(stage) < key_end; };
  struct Key {
    int32_t slot;  // flat slot; -1: outside the split
    int32_t pos, tag;
  };
  auto load_page = [&](int stage) { return in_range(stage) ? key_page(work.table_row, p.page_size, key_of(stage)) : 0; };
  auto load_key = [&](int stage, int32_t page) {
    Key k{-1, 0, 0};
    if (in_range(stage)) {
      k.slot = key_slot(page, p.page_size, p.pool_slots, key_of(stage));
      k.pos = p.pos_cache[k.slot];
      k.tag = p.tag_cache ? p.tag_cache[k.slot] : 0;
    }
    return k;
  };
  // The first stages' block table entries, then their pos / tag: in flight together, and with the
  // loads of the query rows below.
  int32_t first_pages[kStages + 1];
#pragma unroll
  for (int st = 0; st <= kStages; ++st) first_pages[st] = load_page(st);
  Key first_keys[kStages];
#pragma unroll
  for (int st = 0; st < kStages; ++st) first_keys[st] = load_key(st, first_pages[st]);

  // ---- the tile's rows: pos / tag, and Q (sign-flipped for a negative scale) in shared memory ----
  const bool negate = p.scale_log2 < 0.f;
  const float c = fabsf(p.scale_log2);
  if (tid < kDecodeMmaRows) {
    const QueryRow qr = query_row(work.first_token, work.rows_in_seq, work.row0 + tid, p.group, kv_head);
    row_pos[tid] = p.q_pos[qr.token];
    row_tag[tid] = p.q_tag ? p.q_tag[qr.token] : 0;
  }
  for (int ch = tid; ch < kDecodeMmaRows * S::kChunks; ch += kDecodeMmaThreads) {
    const int r = ch / S::kChunks, col = (ch % S::kChunks) * 8;
    const QueryRow qr = query_row(work.first_token, work.rows_in_seq, work.row0 + r, p.group, kv_head);
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (qr.valid) {
      v = load16(p.q + qr.token * p.q_token_stride + qr.head * p.q_head_stride + col);
      if (negate) {  // flip the sign bit of each 16-bit element: exact
        v.x ^= 0x80008000u;
        v.y ^= 0x80008000u;
        v.z ^= 0x80008000u;
        v.w ^= 0x80008000u;
      }
    }
    *reinterpret_cast<uint4*>(q_s + r * kStride + col) = v;
  }
  __syncthreads();

  // A key's rows: the bit mask of the tile's rows that see it (visibility.h), published to shared
  // memory with its slot (-1: not loaded) for the copies and the compute of every warp.
  BlockSummary q_sum = block_summary_empty();  // of the valid rows: proves keys visible to all of them
  if (resolver)
    for (int r = 0; r < valid_rows; ++r) block_summary_add(q_sum, row_pos[r], row_tag[r]);
  auto publish = [&](int stage, const Key& k) {
    if (!resolver) return;
    uint32_t rows = 0u;
    if (k.slot >= 0) {
      BlockSummary k_sum = block_summary_empty();
      block_summary_add(k_sum, k.pos, k.tag);
      if (block_fully_visible(p.rule, q_sum, k_sum)) {
        rows = valid_mask;
      } else {
        for (int r = 0; r < valid_rows; ++r)
          if (key_visible(p.rule, row_pos[r], row_tag[r], k.pos, k.tag)) rows |= 1u << r;
      }
    }
    const int m = stage % kMeta;
    meta_slot[m * kKeys + tid] = rows != 0u ? k.slot : -1;
    meta_mask[m * kKeys + tid] = rows;
  };

  // ---- cp.async of a stage: K and V rows of its keys, 16 bytes a copy; zero-fill where not loaded --
  const T* const k_head = p.k_cache + kv_head * p.k_head_stride;
  const T* const v_head = p.v_cache + kv_head * p.v_head_stride;
  auto issue = [&](int stage) {
    if (stage < n_stages) {
      const int buf = stage % kStages, m = stage % kMeta;
      static_assert(kKeys * S::kChunks % kDecodeMmaThreads == 0, "whole copies per thread");
#pragma unroll
      for (int it = 0; it < kKeys * S::kChunks / kDecodeMmaThreads; ++it) {
        const int ch = tid + it * kDecodeMmaThreads;
        const int key = ch / S::kChunks, col = (ch % S::kChunks) * 8;
        const int32_t slot = meta_slot[m * kKeys + key];
        const int64_t row = slot >= 0 ? slot : 0;  // not read when slot < 0 (src-size 0)
        const int bytes = slot >= 0 ? 16 : 0;
        const int at = (buf * kKeys + key) * kStride + col;
        cp_async_16(k_s + at, k_head + row * p.k_slot_stride + col, bytes);
        cp_async_16(v_s + at, v_head + row * p.v_slot_stride + col, bytes);
      }
    }
    cp_async_commit_group();  // one group per stage, empty past the last: the wait counts stay uniform
  };

  // Prologue: stages 0 .. S - 2 published and in flight; the pipeline registers hold stage S - 1's
  // key (pos / tag loaded) and stage S's block table entry.
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) publish(st, first_keys[st]);
  Key next_key = first_keys[kStages - 1];
  int32_t next_page = first_pages[kStages];
  __syncthreads();
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) issue(st);

  // ---- per-warp state: Q fragments, O accumulators, row max (scaled) and row sum ------------------
  uint32_t qf[S::kQInRegisters ? D / 16 : 1][4];
  if constexpr (S::kQInRegisters) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], q_s + (lane & 15) * kStride + kk * 16 + (lane >> 4) * 8);
  }
  float o[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // rows g, g + 8: max of the scaled visible scores so far
  float l_run[2] = {0.f, 0.f};              // this thread's columns' share of the row sums

  for (int i = 0; i < n_stages; ++i) {
    publish(i + kStages - 1, next_key);
    cp_async_wait_group<kStages - 2>();
    __syncthreads();
    issue(i + kStages - 1);
    next_key = load_key(i + kStages, next_page);  // lands while stage i is computed
    next_page = load_page(i + kStages + 1);

    // ---- compute stage i: this warp's 16 keys -----------------------------------------------
    const int buf = i % kStages, m = i % kMeta;
    const uint32_t lane_key_rows = meta_mask[m * kKeys + warp * 16 + (lane & 15)];  // key lane % 16
    if (!__any_sync(kFullMask, lane_key_rows != 0u)) continue;  // no row sees these keys: O, m, l unchanged
    // rows seeing this thread's keys 8 nt + 2t + j of the warp (fragment columns)
    uint32_t key_rows[2][2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j) key_rows[nt][j] = __shfl_sync(kFullMask, lane_key_rows, nt * 8 + 2 * t + j);

    // S = Q K^T: 2 column tiles of 8 keys, D / 16 k-steps.
    const T* const k_w = k_s + (buf * kKeys + warp * 16) * kStride;
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk2 = 0; kk2 < D / 32; ++kk2) {
      uint32_t qa[2][4];  // Q columns 32 kk2 .. + 15 and + 16 .. + 31
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if constexpr (S::kQInRegisters) {
#pragma unroll
          for (int x = 0; x < 4; ++x) qa[h][x] = qf[2 * kk2 + h][x];
        } else {
          ldmatrix_x4(qa[h], q_s + (lane & 15) * kStride + kk2 * 32 + 16 * h + (lane >> 4) * 8);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        uint32_t bf[4];  // keys 8 nt .. 8 nt + 7, columns 32 kk2 .. 32 kk2 + 31 of K
        ldmatrix_x4(bf, k_w + (nt * 8 + (lane & 7)) * kStride + kk2 * 32 + (lane >> 3) * 8);
        mma_16816<T>(s[nt], qa[0], bf[0], bf[1]);
        mma_16816<T>(s[nt], qa[1], bf[2], bf[3]);
      }
    }

    // Mask and row maxima (raw scores; a row's 16 scores live in the 4 lanes of a quad).
    bool vis[2][4];
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;  // row g (h = 0) or g + 8 (h = 1)
        vis[nt][e] = (key_rows[nt][e & 1] >> (g + 8 * h)) & 1u;
        if (vis[nt][e]) mx[h] = fmaxf(mx[h], s[nt][e]);
      }
    float neg_shift[2], alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = group_max<4>(mx[h]);
      const float m_new = fmaxf(m_run[h], mx[h] == -INFINITY ? -INFINITY : mx[h] * c);
      const float shift = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet stays at 0
      alpha[h] = fast_exp2(m_run[h] - shift);                 // 0 while m_run is -inf
      m_run[h] = m_new;
      neg_shift[h] = -shift;
    }
    float psum[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const float pr = vis[nt][e] ? fast_exp2(fmaf(s[nt][e], c, neg_shift[h])) : 0.f;
        s[nt][e] = pr;
        psum[h] += pr;
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + psum[h];
    scale_accumulator_rows(o, alpha[0], alpha[1]);

    // O += P V: P (16 rows x the warp's 16 keys) is one A fragment, V's 16 rows via ldmatrix.trans.
    mma_pv_16_keys<T, D>(o, s[0], s[1], v_s + (buf * kKeys + warp * 16) * kStride, kStride, lane);
  }

  // ---- merge the 4 warps (shared memory over the drained stage buffers) and write -------------
  cp_async_wait_group<0>();  // only empty groups can be left; the buffers are reused below
  __syncthreads();
  float* const o_s = reinterpret_cast<float*>(smem);  // [warps][16][kOStride]
  float* const m_s = reinterpret_cast<float*>(smem + S::kM);  // [warps][16]
  float* const l_s = reinterpret_cast<float*>(smem + S::kL);
#pragma unroll
  for (int h = 0; h < 2; ++h) l_run[h] = group_sum<4>(l_run[h]);
  if (t == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m_s[warp * kDecodeMmaRows + g + 8 * h] = m_run[h];
      l_s[warp * kDecodeMmaRows + g + 8 * h] = l_run[h];
    }
  }
  __syncthreads();
  // Row r's merged max M = max_w m_w; warp w's share is scaled by exp2(m_w - M) (0 where m_w = -inf).
  auto warp_factor = [&](int w, int r, float big) {
    return big == -INFINITY ? 0.f : fast_exp2(m_s[w * kDecodeMmaRows + r] - big);
  };
  auto row_max = [&](int r) {
    float big = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeMmaWarps; ++w) big = fmaxf(big, m_s[w * kDecodeMmaRows + r]);
    return big;
  };
  {
    const float f0 = warp_factor(warp, g, row_max(g)), f1 = warp_factor(warp, g + 8, row_max(g + 8));
    float* const row0 = o_s + (warp * kDecodeMmaRows + g) * S::kOStride + 2 * t;
    float* const row1 = row0 + 8 * S::kOStride;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      *reinterpret_cast<float2*>(row0 + nd * 8) = make_float2(o[nd][0] * f0, o[nd][1] * f0);
      *reinterpret_cast<float2*>(row1 + nd * 8) = make_float2(o[nd][2] * f1, o[nd][3] * f1);
    }
  }
  __syncthreads();
  // Thread per (row, 8 columns): sum the warps, then the output (one split) or the partial.
  for (int idx = tid; idx < valid_rows * S::kChunks; idx += kDecodeMmaThreads) {
    const int r = idx / S::kChunks, col = (idx % S::kChunks) * 8;
    const float big = row_max(r);
    float total = 0.f;
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < kDecodeMmaWarps; ++w) {
      total += l_s[w * kDecodeMmaRows + r] * warp_factor(w, r, big);
      const float4* src = reinterpret_cast<const float4*>(o_s + (w * kDecodeMmaRows + r) * S::kOStride + col);
      const float4 lo = src[0], hi = src[1];
      a[0] += lo.x, a[1] += lo.y, a[2] += lo.z, a[3] += lo.w;
      a[4] += hi.x, a[5] += hi.y, a[6] += hi.z, a[7] += hi.w;
    }
    const QueryRow qr = query_row(work.first_token, work.rows_in_seq, work.row0 + r, p.group, kv_head);
    const int64_t out_row = qr.token * p.heads + qr.head;  // [total_q, heads] row of the output
    if (p.num_splits == 1) {
      const float inv = total > 0.f ? 1.f / total : 0.f;  // no visible key: zeros
      uint4 packed;
      packed.x = pack2<T>(a[0] * inv, a[1] * inv);
      packed.y = pack2<T>(a[2] * inv, a[3] * inv);
      packed.z = pack2<T>(a[4] * inv, a[5] * inv);
      packed.w = pack2<T>(a[6] * inv, a[7] * inv);
      *reinterpret_cast<uint4*>(p.out + out_row * D + col) = packed;
    } else {
      const int64_t part_row = static_cast<int64_t>(split) * p.total_q * p.heads + out_row;
      float4* dst = reinterpret_cast<float4*>(p.part_acc + part_row * D + col);
      dst[0] = make_float4(a[0], a[1], a[2], a[3]);
      dst[1] = make_float4(a[4], a[5], a[6], a[7]);
      if (col == 0) {
        p.part_m[part_row] = big;
        p.part_l[part_row] = total;
      }
    }
  }
}

}  // namespace skiplayers::cuda
