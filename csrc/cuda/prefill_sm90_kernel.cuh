// The next generation's Hopper prefill (skiplayers::varlen_attention, fp16 / bf16, head dims 64 and
// 128): a FlashAttention-3-style kernel on CuTe, built for sm_90a only.
//
// CTA: 384 threads = a producer warpgroup (warpgroup 0, of which one warp works; setmaxnreg gives its
// registers to the others) + 2 consumer warpgroups (1 and 2); one CTA per SM.
// A CTA owns a query tile of kRows = 128 rows of one sequence and one KV head (rows flatten (token,
// query head of the GQA group), ragged.h), 64 rows per consumer warpgroup.
//
//   before the loop   consumers load Q (plain 16-byte loads, the GQA row packing makes a TMA box
//                     awkward) into 128B-swizzled shared memory; the tile's query summary
//                     (visibility.h BlockSummary) is reduced over the CTA
//   producer warp     walks the sequence's key blocks (kKeys = 128 keys) 32 at a time: one lane per
//                     block reads the block's summary (precomputed by sm90_plan_kernel) and
//                     classifies it: invisible (skipped: never loaded), fully visible, or partial.
//                     For each visible block it takes a free stage of a kStages ring (empty
//                     mbarrier), writes the block's metadata next to the stage (key count, full /
//                     partial, and for partial blocks the keys' pos / tag), then TMA-loads K and V
//                     (box: 64 head dims x 128 keys, SWIZZLE_128B) completing on the stage's full
//                     mbarrier. After the last visible block it sends an end marker through the ring:
//                     the consumers' loop ends there (the causal loop is bounded by the summaries).
//   consumers         per key block: S = Q K^T (wgmma SS, 64 x 128 x D per warpgroup), the predicate
//                     per element on partial blocks only, online softmax in registers (base 2, the
//                     scale folded into one FMA per score: exp2(s * scale_log2 - m_scaled)), P
//                     converted to 16 bits in registers, O += P V (wgmma RS, P as the register A
//                     operand, V^T a transposed view of the same swizzled tile). Software-pipelined:
//                     S of block j + 1 is issued before the softmax of block j, so the tensor cores
//                     compute it meanwhile; K and V have separate rings, so K(j + 1) can land while
//                     V(j) is still in use (two stages suffice at D = 128).
//   epilogue          O / l (zeros for rows that saw no visible key), converted, stored row by row.
//
// Barrier protocol: two rings of kStages slots, K and V; block j uses slot s = j % kStages of both,
// for the u-th time, u = j / kStages, phase parity u & 1:
//   k_full[s]   count 1: the producer's arrive.expect_tx (K bytes; a plain arrive for the end marker)
//               + the TMA transactions. Consumers wait parity (u & 1).
//   v_full[s]   the same for V.
//   k_empty[s]  count kConsumerThreads: every consumer thread arrives once S = Q K^T of block j has
//               completed. The producer waits parity (u & 1) ^ 1 (a slot's first use passes at once).
//   v_empty[s]  the same once O += P V of block j has completed.
// Per block the producer fills K(j) then V(j); the consumers take K(j + 1) before V(j). Deadlock-free
// with kStages >= 2: K(j + 1) needs k_empty of block j + 1 - kStages <= j - 1, whose S completed
// before the consumers looked ahead to j + 1; V(j) needs v_empty of block j - kStages <= j - 2.
// Metadata: kind and key count travel with K (KMeta, read right after k_full), the keys' pos / tag
// of partial blocks with V (VMeta, read in the softmax, before v_empty). Generic stores before the
// producer's arrive (release), reads after the consumers' wait (acquire). Q is written before
// fence.proxy.async + __syncthreads.
#pragma once

#include <cuda.h>  // CUtensorMap (types only: the driver is reached through cudaGetDriverEntryPoint*)

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include <type_traits>

#include "mma_sm80.cuh"  // pack2
#include "prefill_common.cuh"
#include "sm90_layouts.cuh"
#include "sm90_plan.h"
#include "softmax_sm80.cuh"  // fast_exp2

namespace skiplayers::cuda::sm90 {

using namespace cute;
using skiplayers::sm90::key_block_base;

// ---- configuration ----------------------------------------------------------------------------------

constexpr int kThreads = 128 + kConsumerThreads;  // warpgroup 0: the producer (one warp of it works)
constexpr int kWarps = kThreads / 32;
// Registers per thread after setmaxnreg: 128 x 24 + 256 x 240 = 64512 <= 65536 (the launch gives 168
// each; ptxas allocates registers per warpgroup on sm_90, so a 9-warp CTA would get no more than a
// 12-warp one). ptxas allocates each region within its setmaxnreg budget: the consumers need more
// than 232 at D = 128 (two score buffers, O and P: 224 values), the producer fits in 24.
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;
// What setmaxnreg redistributes is what the launch gave the CTA: kThreads x the per-thread count
// (65536 / kThreads rounded down to a multiple of 8: 168), not the whole register file; asking for
// more leaves the consumers spinning in their allocation forever.
static_assert(128 * kProducerRegs + kConsumerThreads * kConsumerRegs <= kThreads * ((65536 / kThreads) & ~7));
constexpr int kStageEnd = 2;                      // KMeta::kind: no more blocks
constexpr int kStagePartial = 0, kStageFull = 1;  // the predicate runs per element / not at all

// What travels with a block besides K and V (written by the producer warp, read by the consumers).
struct KMeta {  // with K: needed when the consumers look ahead
  int32_t kind;  // kStagePartial / kStageFull / kStageEnd
  int32_t keys;  // valid keys of the block (1..kKeys); columns >= keys are masked (partial blocks)
};
struct VMeta {  // with V: needed in the softmax, partial blocks only
  int32_t pos[kKeys];
  int32_t tag[kKeys];
};

// The layouts (sm90_layouts.cuh) and the shared memory of the kernel.
template <typename T, int D>
struct Sm90Config : Sm90Layouts<CuteElem<T>, D> {
  using L = Sm90Layouts<CuteElem<T>, D>;
  using Elem = typename L::Elem;
  using SmemLayoutQ = typename L::SmemLayoutQ;
  using SmemLayoutKV = typename L::SmemLayoutKV;
  using SmemLayoutVt = typename L::SmemLayoutVt;
  using MmaS = typename L::MmaS;
  using MmaO = typename L::MmaO;
  static constexpr int kStages = L::kStages;
  static_assert(sizeof(Elem) == sizeof(T));

  static constexpr int kTileElems = kKeys * D;
  static constexpr uint32_t kTileBytes = kTileElems * sizeof(Elem);  // K or V of a block: TMA transaction bytes

  // Dynamic shared memory: the tiles, each 1024-byte aligned (the period of the 128-byte swizzle,
  // which TMA and wgmma both compute from the address bits).
  struct Tiles {
    alignas(1024) Elem q[kRows * D];
    alignas(1024) Elem k[kStages * kTileElems];
    alignas(1024) Elem v[kStages * kTileElems];
  };
  static constexpr int kDynamicSmem = static_cast<int>(sizeof(Tiles)) + 1024;  // + slack to align the base

  // Static shared memory: barriers, stage metadata, reduction scratch. Only the sm_90a build of the
  // kernel declares it, so its size tells the host which build was loaded (prefill_sm90.cu).
  struct Small {
    alignas(8) uint64_t k_full[kStages];
    uint64_t k_empty[kStages];
    uint64_t v_full[kStages];
    uint64_t v_empty[kStages];
    KMeta kmeta[kStages];
    VMeta vmeta[kStages];
    BlockSummary scratch[kWarps];
  };

  static_assert(sizeof(Tiles) + sizeof(Small) + 1024 <= 227 * 1024, "over the sm_90 shared memory limit");
  // The host tells the sm_90a build from a stub by its static shared memory: more than the 1 KiB that
  // sm_90 reserves per CTA (which cuobjdump / cudaFuncGetAttributes may count for any kernel).
  static_assert(sizeof(Small) > 1024);
};

template <typename T, int D>
struct Sm90Args {
  PrefillParams<T> p;
  CUtensorMap tma_k;  // (D, kv_heads, total_k), box (64, 1, kKeys), SWIZZLE_128B, zero fill out of bounds
  CUtensorMap tma_v;
  const TileCoord* tiles;          // [query tiles upper bound]: (sequence, tile) of each tile (sm90_plan_kernel)
  const BlockSummary* key_blocks;  // [key_block_slots]: summary of each key block (sm90_plan.h slots)
  // The softmax scale as the kernel applies it: scale_log2 > 0, and Q's 16-bit words transformed
  // exactly on load, (q & q_and) ^ q_xor. The row max is taken on the raw scores before scaling, which
  // needs a positive scale: a negative one flips Q's sign bits (S -> -S) and uses |scale|, a zero one
  // zeroes Q (S = 0) and uses 1 (launch_prefill_sm90, prefill_sm90.cu).
  float scale_log2;
  uint32_t q_and, q_xor;
};

// Row `r` of the tile (ragged.h): query_row of device_common.cuh with 32-bit index math. A 64-bit
// division is a subroutine call in SASS, and a call anywhere in a kernel makes ptxas serialise its
// wgmma pipeline (warning C7510); the launcher checks total_q * group < 2^31 so 32 bits suffice.
__device__ __forceinline__ QueryRow tile_row(const PrefillTile& t, int r, uint32_t group) {
  QueryRow q;
  const uint32_t row = static_cast<uint32_t>(t.row0) + static_cast<uint32_t>(r);
  q.valid = row < static_cast<uint32_t>(t.rows_in_seq);
  const uint32_t rr = q.valid ? row : 0u;
  const uint32_t token = rr / group;
  q.token = t.first_token + token;
  q.head = t.kv_head * static_cast<int32_t>(group) + static_cast<int32_t>(rr - token * group);
  return q;
}

// ---- key block summaries -------------------------------------------------------------------------------

// The per-call plan, one warp per item (warp w of the grid):
//   w < num_tiles  tiles[w] = locate_tile(w): the (sequence, tile) of query tile w (its order is the
//                  one of ragged.h; the attention kernel reads its coordinate instead of scanning)
//   w < slots      key_blocks[w] = the summary of the (up to) kKeys keys of the block owning slot w
//                  (sm90_plan.h); unowned slots are left unwritten and never read.
// It also holds the device-side checks of cu_seqlens (locate_tile, and those of prefill_tile for the
// keys): the attention kernel has no assertion, because a call (such as __assert_fail) anywhere in a
// kernel makes ptxas serialise its wgmma pipeline (warning C7510).
constexpr int kPlanWarps = 8;

__global__ void __launch_bounds__(kPlanWarps * 32)
    sm90_plan_kernel(const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, const int32_t* k_pos,
                     const int32_t* k_tag, int32_t batch, int32_t group, int64_t total_q, int64_t total_k,
                     int64_t num_tiles, int64_t slots, TileCoord* tiles, BlockSummary* key_blocks) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kPlanWarps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (w == 0) {
    SKIPLAYERS_DEVICE_CHECK(cu_seqlens_k[0] == 0 && cu_seqlens_k[batch] == total_k,
                            "skiplayers::varlen_attention: cu_seqlens_k must start at 0 and end at total_k");
  }
  if (w < num_tiles) {  // warp-uniform: locate_tile needs the whole warp
    const TileCoord tc = locate_tile(cu_seqlens_q, batch, group, kRows, w, total_q);
    if (tc.seq >= 0) {  // the key range of the tile's sequence, as prefill_tile checks it
      const int64_t key_begin = cu_seqlens_k[tc.seq], keys = cu_seqlens_k[tc.seq + 1] - key_begin;
      SKIPLAYERS_DEVICE_CHECK(key_begin >= 0 && keys >= 0 && key_begin + keys <= total_k,
                              "skiplayers::varlen_attention: cu_seqlens_k must be non-decreasing");
    }
    if (lane == 0) tiles[w] = tc;
  }
  if (w < slots) {
    const skiplayers::sm90::KeyBlock kb = skiplayers::sm90::key_block_of_slot(cu_seqlens_k, batch, kKeys, w);
    if (kb.seq < 0) return;
    const int64_t key_begin = cu_seqlens_k[kb.seq];
    const int64_t keys = cu_seqlens_k[kb.seq + 1] - key_begin;
    SKIPLAYERS_DEVICE_CHECK(key_begin >= 0 && key_begin + keys <= total_k,
                            "skiplayers::varlen_attention: cu_seqlens_k must be non-decreasing");
    const int64_t first = key_begin + kb.block * kKeys;
    const int n = static_cast<int>(keys - kb.block * kKeys < kKeys ? keys - kb.block * kKeys : kKeys);
    const BlockSummary sum = warp_key_summary(k_pos + first, k_tag ? k_tag + first : nullptr, n, lane);
    if (lane == 0) key_blocks[w] = sum;
  }
}

// The query tile of this CTA (grid: (query tiles upper bound, kv_heads)) from the plan: prefill_tile
// of prefill_common.cuh without its search and checks (the plan kernel made them). Tiles are taken
// in reverse order, the heaviest (latest under causality) first.
template <typename T>
__device__ __forceinline__ bool planned_tile(const PrefillParams<T>& p, const TileCoord* tiles, PrefillTile* t) {
  const TileCoord tc = tiles[gridDim.x - 1 - blockIdx.x];
  if (tc.seq < 0) return false;
  tile_at(p, tc, kRows, t);
  return true;
}

// ---- the attention kernel ---------------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) prefill_sm90_kernel(const __grid_constant__ Sm90Args<T, D> args) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Sm90Config<T, D>;
  using Elem = typename C::Elem;
  constexpr int kStages = C::kStages;
  static_assert(layout_matches_tma_boxes<typename C::SmemLayoutKV, kKeys, D, kStages>(),
                "the K/V tile layout differs from what the TMA boxes write");
  static_assert(q_layout_matches_rows<typename C::SmemLayoutQ, kRows, D>(), "unexpected Q tile layout");
  using Barrier = cutlass::arch::ClusterTransactionBarrier;

  __shared__ typename C::Small small;
  extern __shared__ char smem_raw[];
  auto& tiles = *reinterpret_cast<typename C::Tiles*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  // The mbarriers, with a compiler barrier on the side where plain shared-memory data crosses them
  // (CUTLASS's wait / arrive asm has no "memory" clobber): the stage metadata the producer stores
  // before an arrive, and the consumers read after a wait, must not be moved across it by the compiler.
  struct Mbar {
    Barrier& b;
    __device__ void init(uint32_t count) { b.init(count); }
    __device__ void wait(uint32_t parity) {
      b.wait(parity);
      asm volatile("" ::: "memory");
    }
    __device__ void arrive() {
      asm volatile("" ::: "memory");
      b.arrive();
    }
    __device__ void arrive_and_expect_tx(uint32_t bytes) {
      asm volatile("" ::: "memory");
      b.arrive_and_expect_tx(bytes);
    }
  };
  auto bar = [](uint64_t& word) { return Mbar{*reinterpret_cast<Barrier*>(&word)}; };

  const PrefillParams<T>& p = args.p;
  PrefillTile tile;
  if (!planned_tile(p, args.tiles, &tile)) return;  // uniform over the CTA
  const int seq = args.tiles[gridDim.x - 1 - blockIdx.x].seq;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool is_producer = warp < 4;  // warpgroup 0
  const int ctid = tid - 128;         // consumer thread index, 0..255 (the tiled MMAs' thread index)
  const uint32_t group = static_cast<uint32_t>(p.group);

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      bar(small.k_full[s]).init(1);
      bar(small.v_full[s]).init(1);
      bar(small.k_empty[s]).init(kConsumerThreads);
      bar(small.v_empty[s]).init(kConsumerThreads);
    }
    cutlass::arch::fence_barrier_init();
  }

  // Q -> shared memory (rows past the tile's end as zeros) and the query summary.
  BlockSummary q_sum = block_summary_empty();
  if (!is_producer) {
    Tensor sQ = make_tensor(make_smem_ptr(tiles.q), typename C::SmemLayoutQ{});
    constexpr int kChunks = D / 8;  // 16-byte chunks per row
    static_assert(kRows * kChunks % kConsumerThreads == 0);
#pragma unroll 4
    for (int c = ctid; c < kRows * kChunks; c += kConsumerThreads) {
      const int row = c / kChunks, ch = c % kChunks;
      const QueryRow r = tile_row(tile, row, group);
      uint4 v = load16_if(p.q + r.token * p.q_token_stride + r.head * p.q_head_stride + ch * 8, r.valid);
      v.x = (v.x & args.q_and) ^ args.q_xor;
      v.y = (v.y & args.q_and) ^ args.q_xor;
      v.z = (v.z & args.q_and) ^ args.q_xor;
      v.w = (v.w & args.q_and) ^ args.q_xor;
      *reinterpret_cast<uint4*>(&sQ(row, ch * 8)) = v;  // 16-byte chunk: contiguous (q_layout_matches_rows)
    }
    if (ctid < kRows) {
      const QueryRow r = tile_row(tile, ctid, group);
      if (r.valid) block_summary_add(q_sum, p.q_pos[r.token], p.q_tag ? p.q_tag[r.token] : 0);
    }
    cutlass::arch::fence_view_async_shared();  // Q's generic stores -> visible to wgmma (async proxy)
  }
  // Barrier: the mbarriers are initialised, Q is in shared memory, every thread has the query summary.
  q_sum = block_summary_reduce<kWarps>(q_sum, small.scratch);

  if (is_producer) {
    // ---------------------------------------------------------------- producer warp
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (warp != 0) return;
    const int64_t nblocks = ceil_div(tile.keys, kKeys);
    const BlockSummary* sums = args.key_blocks + key_block_base(tile.key_begin, seq, kKeys);
    const int32_t* kpos = p.k_pos + tile.key_begin;
    const int32_t* ktag = p.k_tag ? p.k_tag + tile.key_begin : nullptr;
    constexpr uint64_t kEvictLast = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_LAST);  // K/V: reread by other tiles
    int it = 0;  // blocks sent
    for (int64_t chunk = 0; chunk < nblocks; chunk += 32) {
      const int64_t j = chunk + lane;
      bool may = false, full = false;
      if (j < nblocks) {
        const BlockSummary ks = sums[j];
        may = block_may_be_visible(p.rule, q_sum, ks);
        full = tile.keys - j * kKeys >= kKeys && block_fully_visible(p.rule, q_sum, ks);
      }
      unsigned todo = __ballot_sync(kFullMask, may);
      const unsigned full_bits = __ballot_sync(kFullMask, full);
      while (todo != 0u) {
        const int b = __ffs(todo) - 1;
        todo &= todo - 1;
        const int64_t first = (chunk + b) * kKeys;  // first key of the block, within the sequence
        const int n = static_cast<int>(tile.keys - first < kKeys ? tile.keys - first : kKeys);
        const bool is_full = (full_bits >> b) & 1u;
        const int s = it % kStages;
        const uint32_t free_parity = ((it / kStages) & 1) ^ 1;
        const int32_t row = static_cast<int32_t>(tile.key_begin + first);
        // K(j) and its kind / key count.
        bar(small.k_empty[s]).wait(free_parity);
        if (lane == 0) {
          small.kmeta[s].kind = is_full ? kStageFull : kStagePartial;
          small.kmeta[s].keys = n;
          bar(small.k_full[s]).arrive_and_expect_tx(C::kTileBytes);  // release: orders the stores above
#pragma unroll
          for (int slab = 0; slab < D / kBoxCols; ++slab)
            SM90_TMA_LOAD_3D::copy(&args.tma_k, &small.k_full[s], kEvictLast,
                                   &tiles.k[s * C::kTileElems + slab * kKeys * kBoxCols], slab * kBoxCols,
                                   tile.kv_head, row);
        }
        // V(j) and, for a partial block, its keys' pos / tag.
        bar(small.v_empty[s]).wait(free_parity);
        if (!is_full) {
          VMeta& vm = small.vmeta[s];
#pragma unroll
          for (int i = lane; i < kKeys; i += 32) {
            vm.pos[i] = i < n ? kpos[first + i] : 0;
            vm.tag[i] = i < n && ktag ? ktag[first + i] : 0;
          }
        }
        __syncwarp();  // the lanes' stores happen before lane 0's arrive (a release)
        if (lane == 0) {
          bar(small.v_full[s]).arrive_and_expect_tx(C::kTileBytes);
#pragma unroll
          for (int slab = 0; slab < D / kBoxCols; ++slab)
            SM90_TMA_LOAD_3D::copy(&args.tma_v, &small.v_full[s], kEvictLast,
                                   &tiles.v[s * C::kTileElems + slab * kKeys * kBoxCols], slab * kBoxCols,
                                   tile.kv_head, row);
        }
        ++it;
      }
    }
    // The end marker, through the K ring (the consumers never wait for its V).
    const int s = it % kStages;
    bar(small.k_empty[s]).wait(((it / kStages) & 1) ^ 1);
    if (lane == 0) {
      small.kmeta[s].kind = kStageEnd;
      bar(small.k_full[s]).arrive();
    }
    return;
  }

  // ------------------------------------------------------------------ consumer warpgroups
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  typename C::MmaS mma_s;
  typename C::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(ctid);
  auto thr_o = mma_o.get_thread_slice(ctid);
  Tensor sQ = make_tensor(make_smem_ptr(tiles.q), typename C::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(tiles.k), typename C::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(tiles.v), typename C::SmemLayoutVt{});
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);   // (MMA, 1, D / 16): wgmma descriptors
  Tensor tSrK = thr_s.partition_fragment_B(sK);   // (MMA, 1, D / 16, stage)
  Tensor tOrV = thr_o.partition_fragment_B(sVt);  // (MMA, 1, kKeys / 16, stage)
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kKeys>>{});  // fp32 scores (softmax)
  Tensor tSrS2 = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kKeys>>{});  // wgmma destination
  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kRows>, Int<D>>{});      // fp32 output
  // P (16-bit): the register A operand of O += P V, shaped as the tiled MMA partitions A.
  Tensor tOrP = make_tensor<Elem>(Shape<Shape<_2, _2, _2>, _1, Int<kKeys / 16>>{});
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kKeys>>{}));  // (row, key) of each score
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<D>>{}));    // (row, d) of each output

  // Accumulator layouts of a 64 x N wgmma (per thread): ((2, 2, N / 8), 1, 1), element (a, b, j) at row
  // base + 8b, column 8j + 2t + a (t = lane % 4); compact in that order. The A operand of a
  // 64 x N x 16 RS wgmma per k-step takes the values of two adjacent 8-column groups in the same order,
  // so P is S converted element by element, index for index.
  static_assert(std::is_same_v<decltype(shape(tSrS)), decltype(make_shape(Shape<_2, _2, Int<kKeys / 8>>{}, _1{}, _1{}))>);
  static_assert(std::is_same_v<decltype(shape(tOrO)), decltype(make_shape(Shape<_2, _2, Int<D / 8>>{}, _1{}, _1{}))>);
  static_assert(std::is_same_v<decltype(shape(tOrP)),
                               decltype(shape(thr_o.partition_A(make_identity_tensor(Shape<Int<kRows>, Int<kKeys>>{}))))>);
  static_assert(std::is_same_v<decltype(tSrS.layout()), decltype(make_layout(shape(tSrS)))>, "scores not compact");
  static_assert(std::is_same_v<decltype(tOrP.layout()), decltype(make_layout(shape(tOrP)))>, "P not compact");
  static_assert(size(tSrS) == size(tOrP));
  static_assert(size<2>(tSrQ) == D / 16 && size<3>(tSrK) == kStages && size<2>(tOrV) == kKeys / 16);

  // This thread's two query rows (b = 0, 1): tile rows get<0>(tScS(0)) and get<0>(tScS(2)) = + 8.
  int32_t q_pos[2], q_tag[2];
  bool q_valid[2];
  QueryRow qrow[2];
#pragma unroll
  for (int b = 0; b < 2; ++b) {
    const int r = get<0>(tScS(2 * b));
    qrow[b] = tile_row(tile, r, group);
    q_valid[b] = qrow[b].valid;
    q_pos[b] = p.q_pos[qrow[b].token];
    q_tag[b] = p.q_tag ? p.q_tag[qrow[b].token] : 0;
  }

  clear(tOrO);
  float m_scaled[2] = {-INFINITY, -INFINITY};  // running max of the log2-scaled scores
  float l[2] = {0.f, 0.f};                     // this thread's columns of the running sum
  const float scale_log2 = args.scale_log2;    // > 0 (the sign is folded into Q)

  // Key block j = it: its scores were issued into tSrS2 (one wgmma group) before the iteration, and O +=
  // P V of block it - 1 after it. Per iteration: wait for both, release K(it) and V(it - 1), take the
  // scores, look ahead (K(it + 1): issue its scores into tSrS2), softmax of block it, issue O += P V.
  int it = 0;
  bar(small.k_full[0]).wait(0);
  int kind = small.kmeta[0].kind;
  int keys = small.kmeta[0].keys;
  auto issue_scores = [&](int st) {  // S = Q K^T of K slot st into tSrS2, one committed wgmma group
    warpgroup_fence_operand(tSrS2);
    warpgroup_arrive();
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
    for (int k = 0; k < size<2>(tSrQ); ++k) {
      cute::gemm(mma_s, tSrQ(_, _, k), tSrK(_, _, k, st), tSrS2);
      mma_s.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };
  if (kind != kStageEnd) issue_scores(0);
  while (kind != kStageEnd) {
    const int st = it % kStages;
    warpgroup_wait<0>();  // S of block it, and O += P V of block it - 1
    warpgroup_fence_operand(tSrS2);
    warpgroup_fence_operand(tOrO);
    bar(small.k_empty[st]).arrive();                               // K(it) no longer read
    if (it > 0) bar(small.v_empty[(it - 1) % kStages]).arrive();  // V(it - 1) no longer read
#pragma unroll
    for (int i = 0; i < size(tSrS); ++i) tSrS(i) = tSrS2(i);

    // Look ahead: the next block's K (or the end marker); its scores computed during this softmax.
    const int it_next = it + 1, st_next = it_next % kStages;
    bar(small.k_full[st_next]).wait((it_next / kStages) & 1);
    const int kind_next = small.kmeta[st_next].kind;
    const int keys_next = small.kmeta[st_next].keys;
    if (kind_next != kStageEnd) issue_scores(st_next);

    bar(small.v_full[st]).wait((it / kStages) & 1);  // V(it) and the keys' pos / tag
    // The predicate, on partially visible blocks only (positions and tags, never row indices).
    if (kind == kStagePartial) {
      const VMeta& vm = small.vmeta[st];
#pragma unroll
      for (int i = 0; i < size(tSrS); ++i) {
        const int b = (i >> 1) & 1;
        const int key = get<1>(tScS(i));
        const bool visible = key < keys && q_valid[b] && key_visible(p.rule, q_pos[b], q_tag[b], vm.pos[key], vm.tag[key]);
        tSrS(i) = visible ? tSrS(i) : -INFINITY;
      }
    }

    // Online softmax. The row max is taken on the raw scores and scaled once (scale > 0 keeps the
    // order); a row with no visible key so far keeps m = -inf and shifts by 0, so its p stay 0.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < size(tSrS); ++i) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], tSrS(i));
    float shift[2], alpha[2];
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const float row_max = group_max<4>(mx[b]) * scale_log2;  // the 4 lanes of a quad hold a row
      const float new_m = fmaxf(m_scaled[b], row_max);
      shift[b] = new_m == -INFINITY ? 0.f : new_m;
      alpha[b] = fast_exp2(m_scaled[b] - shift[b]);
      m_scaled[b] = new_m;
    }
    float sum[2] = {0.f, 0.f};
    uint32_t* p_pairs = reinterpret_cast<uint32_t*>(raw_pointer_cast(tOrP.data()));
#pragma unroll
    for (int i = 0; i < size(tSrS); i += 2) {
      const int b = (i >> 1) & 1;  // elements i and i + 1: the same row
      const float p0 = fast_exp2(fmaf(tSrS(i), scale_log2, -shift[b]));
      const float p1 = fast_exp2(fmaf(tSrS(i + 1), scale_log2, -shift[b]));
      sum[b] += p0 + p1;
      p_pairs[i / 2] = pack2<T>(p0, p1);  // P element i = S element i (sm90_fragments_test)
    }
#pragma unroll
    for (int b = 0; b < 2; ++b) l[b] = l[b] * alpha[b] + sum[b];
#pragma unroll
    for (int i = 0; i < size(tOrO); ++i) tOrO(i) *= alpha[(i >> 1) & 1];

    // O += P V, waited for at the top of the next iteration (or after the loop).
    warpgroup_fence_operand(tOrP);
    warpgroup_fence_operand(tOrO);
    warpgroup_arrive();
#pragma unroll
    for (int k = 0; k < size<2>(tOrP); ++k) cute::gemm(mma_o, tOrP(_, _, k), tOrV(_, _, k, st), tOrO);
    warpgroup_commit_batch();

    it = it_next;
    kind = kind_next;
    keys = keys_next;
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(tOrO);

  // Epilogue: O / l, zeros for rows that saw no visible key; each thread stores pairs of columns.
  float inv[2];
#pragma unroll
  for (int b = 0; b < 2; ++b) {
    const float total = group_sum<4>(l[b]);
    inv[b] = total > 0.f ? __fdividef(1.f, total) : 0.f;  // total >= 1 (the max term is 1): exact enough, no subroutine
  }
#pragma unroll
  for (int i = 0; i < size(tOrO); i += 2) {
    const int b = (i >> 1) & 1;
    if (!q_valid[b]) continue;
    const int col = get<1>(tOcO(i));
    T* dst = p.out + (qrow[b].token * p.heads + qrow[b].head) * static_cast<int64_t>(D) + col;
    // inv 0 (no visible key): zeros, even where O holds 0 * inf from a neighbour's V in a partial box
    *reinterpret_cast<uint32_t*>(dst) =
        inv[b] == 0.f ? pack2<T>(0.f, 0.f) : pack2<T>(tOrO(i) * inv[b], tOrO(i + 1) * inv[b]);
  }
#else
  // Built for an architecture without sm_90a features: never launched (prefill_sm90_applies).
  __trap();
#endif
}

}  // namespace skiplayers::cuda::sm90
