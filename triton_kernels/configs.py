"""The fixed launch configurations of every Triton kernel, in one table.

No autotuning: the configurations are few and explicit so that ``python -m skiplayers.aot`` can compile
each one for sm_80 and sm_90 and check its shared memory, registers and spills, and so that the
interpreter tests run the very tile shapes the GPU runs. Reasons for the numbers:

* head dims: 32, 64, 96, 128, 256 (``HEAD_DIMS``); 96 runs on tiles of 128 columns
  (``head_pad``), so it takes 128's tiles or smaller (fp32 prefill: 16 rows, where 128's 32 spill with
  tags); 256 needs smaller tiles (64 query rows for 16-bit prefill, 16 for fp32); 32 takes larger
  ones (16-bit prefill: 128 keys; fp32: 64 rows).
* attention tiles: chosen with ``python -m skiplayers.aot`` as the largest tiles that compile without
  register spills (at most a few dozen bytes of stack) on sm_80 and sm_90 (ptxas -v), tag-evaluating
  variants included; ptxas' register allocation differs between the two architectures. 16-bit inputs use
  tensor-core tiles of 128 query rows (8 warps; head dim 128 steps 32 keys at a time). fp32 inputs are
  computed with full fp32 dots (``input_precision="ieee"``, no TF32), which Triton lowers to FMA
  loops, so their tiles are small (32 rows). The prefill K/V loads sit behind the block-skip test,
  so Triton's software pipeliner does not multi-buffer them; ``num_stages`` changes little.
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
    ("16bit", 32): AttentionConfig(128, 128, 8, 2),
    ("16bit", 64): AttentionConfig(128, 64, 8, 2),
    ("16bit", 96): AttentionConfig(128, 32, 8, 2),  # padded to 128: 128's tile (N64 spills on sm_80)
    ("16bit", 128): AttentionConfig(128, 32, 8, 2),
    ("16bit", 256): AttentionConfig(64, 32, 8, 2),  # M128 spills on sm_80 even with N16; M64/N64 on sm_90
    ("fp32", 32): AttentionConfig(64, 32, 4, 1),
    ("fp32", 64): AttentionConfig(32, 32, 4, 1),
    ("fp32", 96): AttentionConfig(16, 16, 8, 1),  # 128's M32 tile spills 16-24 B with tags
    ("fp32", 128): AttentionConfig(32, 16, 8, 1),
    ("fp32", 256): AttentionConfig(16, 16, 4, 1),
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


def head_pad(head_dim: int) -> int:
    """The kernels' head-dim axis: ``head_dim`` rounded up to a power of two (``tl.arange`` needs one)."""
    return 1 << max(head_dim - 1, 0).bit_length()


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def prefill_config(dtype: torch.dtype, head_dim: int) -> AttentionConfig:
    return _PREFILL[(_dtype_class(dtype), head_dim)]


def decode_config(dtype: torch.dtype, head_dim: int) -> AttentionConfig:
    return _DECODE[(_dtype_class(dtype), head_dim)]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: full-precision dots (TF32 would miss the 1e-5 tolerance). 16-bit inputs: the
    tensor-core default (the setting only affects fp32 operands)."""
    return "ieee" if dtype == torch.float32 else "tf32"
