"""The fixed launch configurations of every Triton kernel, in one table.

No autotuning: the configurations are few and explicit so that ``python -m skiplayers.aot`` can compile
each one for sm_80 and sm_90 and check its shared memory, registers and spills, and so that the
interpreter tests run the very tile shapes the GPU runs. Reasons for the numbers:

* head dims: 32, 64, 96, 128, 256 (``HEAD_DIMS``); 96 runs on tiles of 128 columns
  (``head_pad``), so it takes 128's tiles or smaller; 256 needs smaller tiles; 32 takes larger ones.
* attention tiles: chosen with ``python -m skiplayers.aot`` as the largest tiles that compile without
  register spills on sm_80 and sm_90 (ptxas -v), every compile-time variant included (tags; the
  ANCHORS variant of the prefill kernel, which has a third loop over the anchor list). ptxas' register
  allocation differs between the two architectures, so a prefill configuration may differ per
  architecture family (``_PREFILL_BY_MAJOR``, keyed by the compute capability's major version). The
  interpreter, with no device, runs the default table (the sm_90 one); a family's other tile shape
  is the same kernel with another tile, compiled by the AOT check and run under the interpreter by
  ``test_prefill_runs_each_architectures_tiles``. The block plan kernel (``block_plan.py``) is
  launched with the prefill tile's ``BLOCK_M``/``BLOCK_N``, so it follows this table.
  16-bit prefill uses tensor-core tiles of 128 query rows on 8 warps where they fit (on sm_80 the
  ANCHORS variant of the head-dim-128 tile spilled 40-64 bytes, so sm_80 takes 64 rows on 4 warps for
  128 and 96). fp32 inputs are computed with full fp32 dots (``input_precision="ieee"``, no TF32),
  which Triton lowers to FMA loops, so their tiles are small, and ptxas' choices are erratic (8 warps
  may spill at 80 registers where 4 warps fit in 100, or the reverse): fp32 128 and 96 take 8 warps on
  sm_90 but 4 on sm_80 (96: 16 rows there).
  The prefill kernel's loops over the block lists have no branch around their loads
  (``prefill_attention.py``), so Triton's software pipeliner multi-buffers the K/V loads: 16-bit
  configurations use ``num_stages = 3`` (three K and three V buffers; the next block's ``cp.async``
  copies stay in flight while a block computes, on sm_80 with ``mma.sync`` and on sm_90 with
  ``wgmma``; 41-131 KB of shared memory), without spills. fp32 configurations keep one stage (two
  stages spill). Prefill under the merged kernel (block lists and head-dim padding),
  ``python -m skiplayers.aot`` with every dtype, variant (causal, tags, tags + anchor list) and
  architecture compiled (CI compiles fewer for 32/96/256: ``aot_specs.py``): registers per thread;
  spills 0 unless said:

  ======  ========  ==========================  =======================  ==========================
  dtype   head dim  sm_80                       sm_90                    tried, spilled
  ======  ========  ==========================  =======================  ==========================
  16-bit  32        M128/N128/w8/s3: 186-216    same: 200-255
  16-bit  64        M128/N64/w8/s3: 184-194     same: 169-242
  16-bit  96        M64/N32/w4/s3: 244-255      M128/N32/w8/s3: 199-246  (128's tiles)
  16-bit  128       M64/N32/w4/s3: 244-255      M128/N32/w8/s3: 198-244  sm_80 M128/w8: 40-64 B
  16-bit  256       M64/N32/w8/s3: 254-255      same: 244-255
  fp32    32        M64/N32/w4/s1: 164-253      same: 149-247
  fp32    64        M32/N16/w8/s1: 120-127      same: 125-128
  fp32    96        M16/N16/w4/s1: 96-112       M32/N16/w8/s1: 80-90     sm_80 M32/w8: 16-48 B;
                                                                         sm_90 M32/w4: 1.2-1.6 KB,
                                                                         M16/w8: 8-16 B
  fp32    128       M32/N16/w4/s1: 144-146      M32/N16/w8/s1: 80-86
  fp32    256       M16/N16/w4/s1: 168-180;     same: 144-147            sm_80 w8: 32-56 B; M32 or
                    80 B spilled (tags), 8 B                             N32 on w4 or w8: 16-224 B;
                    (anchors): the least found                           w2: 96-160 B
  ======  ========  ==========================  =======================  ==========================

* decode: ``BLOCK_M = 16`` rows (the minimum ``tl.dot`` tile) hold the new queries times the GQA
  group; ``BLOCK_N`` keys (cache slots, whatever the page size) per step; the work is bound by
  reading the cache, so 16-bit inputs take the largest key tile that compiles without spills (more
  bytes of K and V in flight per program, fewer loop trips). The kernel reads its paged metadata
  ahead by hand (``decode_attention.attend_paged_keys``) and Triton's pipeliner leaves its loop
  alone, so ``num_stages`` changes little. Paging costs registers (the per-slot page numbers and
  addresses of three tiles in flight), which is what kept 16-bit tiles at 32 keys with 4 warps
  (head dim 128: 168-200 registers, and 32 B of spills with tags on sm_90). Those registers are per
  *thread*: with 8 warps each thread holds half as many slots, and the 16-bit tiles grow to 128-256
  keys without spills. ``python -m skiplayers.aot``, 16-bit decode (fp16 and bf16, with and without
  tags, sm_80 and sm_90): registers per thread, spills 0 unless said:

  ========  ===================  ============================  =====================================
  head dim  adopted              before (N32/w4)               next larger tried
  ========  ===================  ============================  =====================================
  32        N256/w8: 160-185     109-126                       (none larger)
  64        N256/w8: 195-210     128-164                       (none larger); N64/w4: 56 B spilled
  96        N128/w8: 228-246     168; 32 B spilled (tags)      N256/w8: 8 B spilled (sm_80, tags)
  128       N256/w8: 250-255     144-200; 32 B spilled (tags)  (none larger)
  256       N64/w8: 211-238      234-255; 32 B spilled (tags)  N128/w8: 356-576 B spilled
  ========  ===================  ============================  =====================================

  Shared memory grows with the tile (head dim 128, N256: 76 KB, under both limits). fp32 tiles stay
  small (FMA dots: 16-64 keys, 4 warps; 256: 8 warps, as 4 spill on sm_90). Not measured on a GPU
  here: the speed-up of the larger tiles is what the next GPU run must confirm
  (``benchmarks/``); a tile larger than a short cache only costs masked lanes (no memory is read
  for slots past the cache length).
* row kernels: memory-bound copies; ``BLOCK`` mask entries per program, ``BLOCK_C`` columns per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The head dims of the LLaMA family the attention kernels take; the one list (the checks, the AOT specs
# and the tests' refusal message derive from it). A dim that is not a power of two (96) is padded to
# the next one inside the kernels (``head_pad``; ``attention_core.head_tile``).
HEAD_DIMS = (32, 64, 96, 128, 256)
# The one message for any other head dim (``str.format`` with it), derived from HEAD_DIMS: the checks
# raise it and tests/backends.py expects it.
HEAD_DIM_REFUSAL = (f"the Triton backend supports head_dim {', '.join(map(str, HEAD_DIMS[:-1]))} and {HEAD_DIMS[-1]}, "
                    "got {}")
ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return f"M{self.block_m}/N{self.block_n}/w{self.num_warps}/s{self.num_stages}"


@dataclass(frozen=True)
class RowConfig:
    block: int
    block_c: int
    num_warps: int
    num_stages: int = 1

    @property
    def label(self) -> str:
        return f"B{self.block}/C{self.block_c}/w{self.num_warps}"


_PREFILL = {
    ("16bit", 32): AttentionConfig(128, 128, 8, 3),
    ("16bit", 64): AttentionConfig(128, 64, 8, 3),
    ("16bit", 96): AttentionConfig(128, 32, 8, 3),  # padded to 128: 128's tile
    ("16bit", 128): AttentionConfig(128, 32, 8, 3),
    ("16bit", 256): AttentionConfig(64, 32, 8, 3),
    ("fp32", 32): AttentionConfig(64, 32, 4, 1),
    ("fp32", 64): AttentionConfig(32, 16, 8, 1),
    ("fp32", 96): AttentionConfig(32, 16, 8, 1),
    ("fp32", 128): AttentionConfig(32, 16, 8, 1),
    ("fp32", 256): AttentionConfig(16, 16, 4, 1),
}
# Where an architecture family (compute capability major) needs another configuration.
_PREFILL_BY_MAJOR = {
    8: {
        ("fp32", 128): AttentionConfig(32, 16, 4, 1),
        ("16bit", 128): AttentionConfig(64, 32, 4, 3),
        ("16bit", 96): AttentionConfig(64, 32, 4, 3),
        ("fp32", 96): AttentionConfig(16, 16, 4, 1),
    },
}
_DECODE = {
    ("16bit", 32): AttentionConfig(16, 256, 8, 2),
    ("16bit", 64): AttentionConfig(16, 256, 8, 2),
    ("16bit", 96): AttentionConfig(16, 128, 8, 2),  # N256 spills 8 B (sm_80, tags)
    ("16bit", 128): AttentionConfig(16, 256, 8, 2),
    ("16bit", 256): AttentionConfig(16, 64, 8, 2),  # N128: 350-580 B of spills
    ("fp32", 32): AttentionConfig(16, 64, 4, 1),
    ("fp32", 64): AttentionConfig(16, 32, 4, 1),
    ("fp32", 96): AttentionConfig(16, 16, 4, 1),
    ("fp32", 128): AttentionConfig(16, 16, 4, 1),
    ("fp32", 256): AttentionConfig(16, 16, 8, 1),  # 4 warps spill 124 B on sm_90
}
COMBINE_NUM_WARPS = 1  # one (query, head) row of HEAD_DIM floats per program
SCAN = RowConfig(block=1024, block_c=0, num_warps=4)  # CHUNK blocks per step of the per-row scan
COMPACT = RowConfig(block=64, block_c=64, num_warps=8)  # mask entries per program; columns per step (8 warps: ~150 regs, not ~250)
APPEND = RowConfig(block=16, block_c=128, num_warps=4)
# The prefill block plan (block_plan.py): up to PLAN_CHUNK key blocks classified per step of its loop,
# and at most PLAN_CHUNK_KEYS keys (a program reads their position and tag per step): 16 blocks of
# 16-64 keys, 8 of the 128-key tiles (16 of those spilled 16 bytes on sm_90: M128/N128).
PLAN_CHUNK = 16
PLAN_CHUNK_KEYS = 1024
PLAN_NUM_WARPS = 8  # 4 warps spilled 36 bytes (M128/N64, sm_80)


def head_pad(head_dim: int) -> int:
    """The kernels' head-dim axis: ``head_dim`` rounded up to a power of two (``tl.arange`` needs one)."""
    return 1 << max(head_dim - 1, 0).bit_length()


def plan_chunk(block_n: int) -> int:
    """Key blocks per step of the block plan kernel for a prefill tile of ``block_n`` keys."""
    return max(1, min(PLAN_CHUNK, PLAN_CHUNK_KEYS // block_n))


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def prefill_config(dtype: torch.dtype, head_dim: int, arch: int | None = None) -> AttentionConfig:
    """The prefill configuration for a compute capability ``arch`` (e.g. 80, 90; None: the default
    table, as under the interpreter)."""
    key = (_dtype_class(dtype), head_dim)
    family = _PREFILL_BY_MAJOR.get(arch // 10, {}) if arch is not None else {}
    return family.get(key, _PREFILL[key])


def decode_config(dtype: torch.dtype, head_dim: int) -> AttentionConfig:
    return _DECODE[(_dtype_class(dtype), head_dim)]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: full-precision dots (TF32 would miss the 1e-5 tolerance). 16-bit inputs: the
    tensor-core default (the setting only affects fp32 operands)."""
    return "ieee" if dtype == torch.float32 else "tf32"
