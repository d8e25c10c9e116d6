"""The fixed launch configurations of every Triton kernel, in one table.

No autotuning: the configurations are few and explicit so that ``python -m skiplayers.aot`` can compile
each one for sm_80 and sm_90 and check its shared memory, registers and spills, and so that the
interpreter tests run the very tile shapes the GPU runs. Reasons for the numbers:

* attention tiles: chosen with ``python -m skiplayers.aot`` as the largest tiles that compile without
  register spills on sm_80 and sm_90 (ptxas -v), every compile-time variant included (tags; the
  ANCHORS variant of the prefill kernel, which has a third loop over the anchor list). ptxas' register
  allocation differs between the two architectures, so a configuration may differ per architecture
  family (``_PREFILL_BY_MAJOR``, keyed by the compute capability's major version). The interpreter,
  with no device, runs the default table; a family's other tile shape (sm_80, 16-bit head dim 128:
  64 query rows) is the same kernel with another ``BLOCK_M``, compiled by the AOT check. 16-bit
  inputs use tensor-core tiles of 128 query rows (8 warps; head dim 128 steps 32 keys at a time; on
  sm_80 the ANCHORS variant of that tile spilled 40-64 bytes, so sm_80 takes 64 rows on 4 warps).
  fp32 inputs are computed with full fp32 dots (``input_precision="ieee"``, no TF32), which Triton
  lowers to FMA loops, so their tiles are small (32 rows, 16 keys per step: with 32 keys the
  untagged head-dim-64 kernel spilled); fp32 head dim 128 takes 8 warps on sm_90 but 4 on sm_80 (where
  8 warps spill 16 bytes; 4 warps spill over a kilobyte on sm_90).
  The prefill kernel's loops over the block lists have no branch around their loads
  (``prefill_attention.py``), so Triton's software pipeliner multi-buffers the K/V loads: 16-bit
  configurations use ``num_stages = 3`` (three K and three V buffers; the next block's ``cp.async``
  copies stay in flight while a block computes, on sm_80 with ``mma.sync`` and on sm_90 with
  ``wgmma``; 50-82 KB of shared memory), without spills. fp32 configurations keep one stage (two
  stages spill).
* decode: ``BLOCK_M = 16`` rows (the minimum ``tl.dot`` tile) hold the new queries times the GQA
  group; ``BLOCK_N`` keys (cache slots, whatever the page size) per step; the work is bound by
  reading the cache. The kernel reads its paged metadata ahead by hand
  (``decode_attention.attend_paged_keys``) and Triton's pipeliner leaves its loop alone, so
  ``num_stages`` changes little. Paging costs registers (the per-slot page numbers and addresses):
  128-200 per thread on sm_80/sm_90 where the rectangular cache took 96-162; ptxas then spills a few
  dozen bytes in one variant (16-bit, head dim 128, tags, sm_90), as it did in another before.
* row kernels: memory-bound copies; ``BLOCK`` mask entries per program, ``BLOCK_C`` columns per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HEAD_DIMS = (64, 128)
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
    ("16bit", 64): AttentionConfig(128, 64, 8, 3),
    ("16bit", 128): AttentionConfig(128, 32, 8, 3),
    ("fp32", 64): AttentionConfig(32, 16, 8, 1),
    ("fp32", 128): AttentionConfig(32, 16, 8, 1),
}
# Where an architecture family (compute capability major) needs another configuration.
_PREFILL_BY_MAJOR = {
    8: {
        ("fp32", 128): AttentionConfig(32, 16, 4, 1),
        ("16bit", 128): AttentionConfig(64, 32, 4, 3),
    },
}
_DECODE = {
    ("16bit", 64): AttentionConfig(16, 32, 4, 2),
    ("16bit", 128): AttentionConfig(16, 32, 4, 2),
    ("fp32", 64): AttentionConfig(16, 32, 4, 1),
    ("fp32", 128): AttentionConfig(16, 16, 4, 1),
}
COMBINE_NUM_WARPS = 1  # one (query, head) row of HEAD_DIM floats per program
SCAN = RowConfig(block=1024, block_c=0, num_warps=4)  # CHUNK blocks per step of the per-row scan
COMPACT = RowConfig(block=64, block_c=64, num_warps=8)  # mask entries per program; columns per step (8 warps: ~150 regs, not ~250)
APPEND = RowConfig(block=16, block_c=128, num_warps=4)
# The prefill block plan (block_plan.py): PLAN_CHUNK key blocks classified per step of its loop, so a
# program reads PLAN_CHUNK * BLOCK_N keys' metadata per step (1024-2048 int32 pairs).
PLAN_CHUNK = 16
PLAN_NUM_WARPS = 8  # 4 warps spilled 36 bytes (M128/N64, sm_80)


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
