"""A patched model under transformers tensor parallelism gives the tokens of a single process.

Run with two processes on the CPU (gloo):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc-per-node 2 scripts/tp_check.py

Rank 0 saves a tiny random LlamaForCausalLM (4 layers, hidden 128, 4 query / 2 KV heads, head dim
32, vocab 101, float32) to a temporary directory shared through the process group. Every rank
loads it with ``tp_plan="auto"`` (through ``DistributedConfig``: passing ``tp_plan=`` directly to
``from_pretrained`` still works in transformers 5.23 but warns that it is deprecated), checks that
the attention and MLP weights really are sharded, patches it with a context stop at layer 2 and
runs a prefill forward and greedily generates 8 tokens for a left-padded batch with a context
mask. Rank 0 then does the same with the checkpoint loaded in one process without a plan, patched
the same way, and compares: the greedy tokens must be identical and the prefill logits (at the
columns that are computed) within 1e-4.

Prints one line ``tp_check: OK ...`` or ``tp_check: MISMATCH ...`` / ``tp_check: FAILED ...``
(rank 0) and exits 0 only when the tokens are identical and the logits agree. ``--backend`` picks the skiplayers
backend (default "cpu", the C++ kernels).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

import skiplayers as sk

CONTEXT_STOP = 2
NEW_TOKENS = 8
LOGIT_ATOL = 1e-4  # float32: the sharded model sums the projections' halves in another order


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        # Larger random weights than the default 0.02, whose tiny model repeats one token: varied
        # greedy tokens make the comparison sensitive to every step.
        initializer_range=0.1,
    )


def ragged_batch():
    """Three left-padded prompts with context spans of 11, 4 and 7 tokens (first token never context)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 101, (3, 21), generator=gen)
    attn = torch.ones(3, 21, dtype=torch.long)
    attn[1, :4] = 0
    attn[2, :9] = 0
    ctx = torch.zeros(3, 21, dtype=torch.bool)
    ctx[0, 1:12] = True
    ctx[1, 5:9] = True
    ctx[2, 10:17] = True
    return ids, attn, ctx


def shared_dir(rank: int) -> str:
    """A directory rank 0 creates and every rank knows (broadcast through the process group)."""
    box = [tempfile.mkdtemp(prefix="skiplayers-tp-") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_sharded(weight, full_rows: int) -> bool:
    """A column-wise sharded projection holds a DTensor or a local slice with fewer rows than the full one."""
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return local.shape[0] < full_rows


@torch.no_grad()
def patched_run(model, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The patched model's prefill logits at the computed columns (real tokens outside the context)
    and its greedy tokens ``[B, T + NEW_TOKENS]``. Refuses a run whose cache shows no context stop
    (layers from the stop layer on must store fewer tokens), which would mean the patch did not
    take effect."""
    ids, attn, ctx = ragged_batch()
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    with sk.patched(model, sk.SkipPolicy(context_stop_layer=CONTEXT_STOP), backend=backend):
        logits = model(ids, attention_mask=attn, position_ids=positions, context_mask=ctx, use_cache=False).logits
        out = model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=NEW_TOKENS,
                             do_sample=False, return_dict_in_generate=True)
    lengths = out.past_key_values.layer_lengths()  # [L, B]
    dropped = lengths[CONTEXT_STOP - 1] - lengths[CONTEXT_STOP]
    if not torch.equal(dropped, ctx.sum(1)):
        raise RuntimeError(f"the cache does not show the context stop: stored tokens per layer {lengths.tolist()}")
    return logits[attn.bool() & ~ctx], out.sequences


def check(rank: int, world: int, path: str, backend: str) -> tuple[bool, str]:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers.distributed import DistributedConfig

    if rank == 0:
        torch.manual_seed(0)
        LlamaForCausalLM(tiny_config()).save_pretrained(path)
    dist.barrier()

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path, distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.float32
    ).eval()
    config = model.config
    q_rows = config.num_attention_heads * config.head_dim
    attn0 = model.model.layers[0].self_attn
    if not (is_sharded(attn0.q_proj.weight, q_rows) and is_sharded(model.model.layers[0].mlp.up_proj.weight,
                                                                      config.intermediate_size)):
        return False, f"the model loaded with tp_plan='auto' is not sharded (q_proj {tuple(attn0.q_proj.weight.shape)})"
    tp_logits, tp_tokens = patched_run(model, backend)
    seconds = time.perf_counter() - start
    if rank != 0:
        return True, ""

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref_logits, ref_tokens = patched_run(reference, backend)
    logit_err = (tp_logits - ref_logits).abs().max().item()
    new = slice(ref_tokens.shape[1] - NEW_TOKENS, None)
    what = (f"{world} ranks (gloo), backend {backend!r}, context stop {CONTEXT_STOP} of {config.num_hidden_layers}, "
            f"batch of {ref_tokens.shape[0]} x {NEW_TOKENS} new tokens, prefill |logits diff| {logit_err:.2g}, "
            f"{seconds:.1f} s")
    if torch.equal(tp_tokens, ref_tokens) and logit_err <= LOGIT_ATOL:
        return True, f"OK: tensor-parallel patched tokens equal the single-process patched tokens; {what}"
    return False, (f"MISMATCH: {what}\n  tp:     {tp_tokens[:, new].tolist()}\n"
                   f"  single: {ref_tokens[:, new].tolist()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cpu", help="skiplayers backend (torch | cpu)")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        print("tp_check: run under torchrun: python -m torch.distributed.run --nproc-per-node 2 "
              "scripts/tp_check.py", file=sys.stderr)
        return 2
    # A short timeout: if one rank fails inside a collective the other must not wait for the default 30 min.
    dist.init_process_group(backend="gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    path = shared_dir(rank)
    try:
        try:
            ok, message = check(rank, world, path, args.backend)
        except Exception as err:  # noqa: BLE001  (report how it fails, on the rank where it failed, then agree on failure)
            ok, message = False, f"FAILED on rank {rank}: {type(err).__name__}: {err}"
            traceback.print_exc()
        # Every rank learns whether any rank failed, so all exit with the same status.
        verdicts = [None] * world
        dist.all_gather_object(verdicts, (ok, message))
        all_ok = all(v[0] for v in verdicts)
        if rank == 0:
            failures = [m for v_ok, m in verdicts if not v_ok and m]
            print("tp_check: " + (message if all_ok else "\n".join(failures)), flush=True)
        return 0 if all_ok else 1
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
