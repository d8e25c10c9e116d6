"""The oracle layer allocator: per prompt, the fewest layers whose greedy output is the full model's.

Glavas et al. 2024 (arXiv 2410.20022) found that an oracle allocation of layers per sequence matched
the full model with 23.3% of the layers on average. :func:`oracle_routes` searches, for each prompt,
the number of executed layers ``s`` by bisection (assuming, as a search heuristic, that fewer layers
never match more easily); at each ``s`` it tries the candidate subsets of the paper's families:

* ``first``: the first ``s`` layers (the trailing layers dropped);
* ``spread``: ``s`` layers evenly spaced from the first to the last (a skip pattern);
* ``ends``: the first ``ceil(s/2)`` and the last ``floor(s/2)`` layers (the middle dropped);
* ``random``: ``budget`` random subsets of ``s`` layers (seeded per prompt and ``s``).

All candidates of one ``s`` run as one batch of the same prompt, each sequence with its own
``layer_mask`` row (the patched model leaves each sequence's skipped layers out of the
computation). A candidate matches when at least ``min_agreement`` of its ``max_new_tokens`` greedy
tokens equal the full model's (1.0: the same output). The routes come back as a ``layer_mask``
``[P, L]`` for the prompts run as one batch (:func:`run_routes`).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .patching import patched
from .policy import SkipPolicy
from .prompts import left_padded, pad_token_id


def routes_mask(routes: Sequence[Sequence[int]], num_layers: int) -> torch.Tensor:
    """bool ``[len(routes), num_layers]``: True where a route runs the layer."""
    mask = torch.zeros(len(routes), num_layers, dtype=torch.bool)
    for row, layers in enumerate(routes):
        mask[row, list(layers)] = True
    return mask


def candidate_layers(num_layers: int, kept: int, budget: int, seed: int) -> list[tuple[str, tuple[int, ...]]]:
    """``(family, layers)`` candidates with ``kept`` of ``num_layers`` layers, without duplicates."""
    if not 1 <= kept <= num_layers:
        raise ValueError(f"kept must be in [1, {num_layers}], got {kept}")
    spread = sorted({round(i * (num_layers - 1) / max(kept - 1, 1)) for i in range(kept)}) if kept > 1 else [0]
    found = [
        ("first", tuple(range(kept))),
        ("spread", tuple(spread)),
        ("ends", tuple(range(-(-kept // 2))) + tuple(range(num_layers - kept // 2, num_layers))),
    ]
    rng = random.Random(seed * 1000 + kept)
    found += [("random", tuple(sorted(rng.sample(range(num_layers), kept)))) for _ in range(budget)]
    out, seen = [], set()
    for family, layers in found:
        if len(layers) == kept and layers not in seen:
            seen.add(layers)
            out.append((family, layers))
    return out


@dataclass
class OracleRoute:
    """One prompt's route: the layers it runs, the candidate family that found them, and the
    fraction of its greedy tokens equal to the full model's."""

    prompt: int
    layers: list[int]
    family: str
    agreement: float
    tried: int  # candidates generated for this prompt


@dataclass
class OracleResult:
    num_layers: int
    max_new_tokens: int
    min_agreement: float
    routes: list[OracleRoute]
    seconds: float

    @property
    def layer_mask(self) -> torch.Tensor:
        """bool ``[P, L]``: the routes, for the prompts run as one batch."""
        return routes_mask([route.layers for route in self.routes], self.num_layers)

    @property
    def mean_fraction(self) -> float:
        """Mean over prompts of the fraction of layers run."""
        return sum(len(r.layers) for r in self.routes) / (len(self.routes) * self.num_layers)

    def to_json(self) -> dict:
        return {"num_layers": self.num_layers, "max_new_tokens": self.max_new_tokens,
                "min_agreement": self.min_agreement, "mean_fraction_of_layers": self.mean_fraction,
                "seconds": self.seconds, "routes": [asdict(r) for r in self.routes]}


def _greedy(model, ids: torch.Tensor, layer_mask: torch.Tensor | None, new_tokens: int, pad: int) -> torch.Tensor:
    """Greedy tokens ``[k, new_tokens]`` of ``k`` copies of one prompt ``ids [1, T]`` (no padding)."""
    k = 1 if layer_mask is None else layer_mask.shape[0]
    batch = ids.expand(k, -1)
    out = model.generate(batch, attention_mask=torch.ones_like(batch), layer_mask=layer_mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return out[:, ids.shape[1]:]


def _tokenize(tokenizer, prompts) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        ids = tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        out.append(ids)
    return out


@torch.no_grad()
def oracle_routes(model, tokenizer, prompts: Sequence, max_new_tokens: int = 32, budget: int = 8,
                  min_agreement: float = 1.0, seed: int = 0, backend: str | None = None,
                  progress: bool = True) -> OracleResult:
    """The oracle allocation for each of ``prompts`` (strings, tokenised with ``tokenizer``, or
    lists of token ids) on ``model`` (an unpatched causal LM of the LLaMA family; it is patched
    for the search and restored). ``budget``: random candidates per tried layer count. Returns an
    :class:`OracleResult`; ``result.layer_mask`` runs the routes as a batch (:func:`run_routes`)."""
    if not 0.0 < min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in (0, 1], got {min_agreement}")
    if max_new_tokens < 1 or budget < 0:
        raise ValueError("max_new_tokens must be >= 1 and budget >= 0")
    from tqdm import tqdm

    num_layers = model.config.num_hidden_layers
    pad = pad_token_id(tokenizer) if tokenizer is not None else 0
    token_lists = _tokenize(tokenizer, prompts)
    device = next(model.parameters()).device
    start = time.perf_counter()
    routes = []
    with patched(model, SkipPolicy(), backend):
        for index, ids in enumerate(tqdm(token_lists, desc="oracle", unit="prompt", disable=not progress)):
            prompt = torch.tensor([ids], device=device)
            full = _greedy(model, prompt, None, max_new_tokens, pad)[0]
            best = OracleRoute(index, list(range(num_layers)), "full", 1.0, 0)
            low, high = 1, num_layers  # high always has a matching route (the full model)
            while low < high:
                kept = (low + high) // 2
                candidates = candidate_layers(num_layers, kept, budget, seed + index)
                mask = routes_mask([layers for _, layers in candidates], num_layers)
                tokens = _greedy(model, prompt, mask, max_new_tokens, pad)
                agreement = (tokens == full[None]).float().mean(dim=1)
                best.tried += len(candidates)
                winner = int(agreement.argmax())
                if float(agreement[winner]) >= min_agreement:
                    family, layers = candidates[winner]
                    best = OracleRoute(index, list(layers), family, float(agreement[winner]), best.tried)
                    high = kept
                else:
                    low = kept + 1
            routes.append(best)
    return OracleResult(num_layers, max_new_tokens, min_agreement, routes, time.perf_counter() - start)


@torch.no_grad()
def run_routes(model, tokenizer, prompts: Sequence, result: OracleResult, runs: int = 3,
               backend: str | None = None) -> dict:
    """Runs all prompts as one left-padded batch, unpatched and patched with the oracle's
    ``layer_mask``, interleaved ``runs`` times; returns the median times, the speedup, the bound
    given by the layer-row work (``sk.work_report``) and how many tokens agree with the unpatched
    batch's."""
    from .work import work_report

    pad = pad_token_id(tokenizer) if tokenizer is not None else 0
    ids, attn, _ = left_padded([(p, [False] * len(p)) for p in _tokenize(tokenizer, prompts)], pad)
    device = next(model.parameters()).device
    ids, attn, mask = ids.to(device), attn.to(device), result.layer_mask
    kwargs = dict(attention_mask=attn, max_new_tokens=result.max_new_tokens, min_new_tokens=result.max_new_tokens,
                  do_sample=False, pad_token_id=pad)
    times: dict[str, list[float]] = {"full": [], "routed": []}
    outputs = {}
    work = None
    for _ in range(runs):
        begin = time.perf_counter()
        outputs["full"] = model.generate(ids, **kwargs)
        times["full"].append(time.perf_counter() - begin)
        with patched(model, SkipPolicy(), backend):
            work_report(model, reset=True)
            begin = time.perf_counter()
            outputs["routed"] = model.generate(ids, layer_mask=mask, **kwargs)
            times["routed"].append(time.perf_counter() - begin)
            work = work_report(model)
    assert work is not None, "runs must be at least 1"
    full_s, routed_s = statistics.median(times["full"]), statistics.median(times["routed"])
    new = slice(ids.shape[1], None)
    return {
        "batch": ids.shape[0], "prompt_columns": ids.shape[1], "runs": runs,
        "full_s": full_s, "routed_s": routed_s, "speedup": full_s / routed_s,
        "work_bound": work.full_row_layers / work.row_layers,
        "token_agreement": float((outputs["full"][:, new] == outputs["routed"][:, new]).float().mean()),
    }


def load_prompts(spec: str | Path, tokenizer) -> tuple[str, list[list[int]]]:
    """Token ids of the prompts in ``builtin:NAME`` or a task JSONL (few-shot items,
    ``skiplayers.tasks``: the item's few-shot prompt, ``prompts.fewshot_prompt_ids``), or in a
    JSONL of ``{"prompt": "..."}`` lines (tokenised with the tokenizer's special tokens)."""
    from .prompts import fewshot_prompt_ids
    from .tasks import TaskFileError, load_tasks

    spec = str(spec)
    path = Path(spec)
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
        if not lines:
            raise TaskFileError(f"{spec}: no prompts (the file is empty)")
        objects = []
        for n, line in lines:
            try:
                objects.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise TaskFileError(f"{spec} line {n}: not valid JSON ({err.msg} at column {err.colno})") from None
        if isinstance(objects[0][1], dict) and "prompt" in objects[0][1]:
            prompts = []
            for n, obj in objects:
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                    raise TaskFileError(f"{spec} line {n}: expected {{\"prompt\": \"...\"}} with a non-empty string")
                prompts.append(tokenizer(obj["prompt"])["input_ids"])
            return path.stem, prompts
    name, items = load_tasks(spec)
    return name, [fewshot_prompt_ids(tokenizer, it.instructions, it.examples, it.query)[0] for it in items]


def plot_routes(result: OracleResult, path) -> Path:
    """A PNG: layers kept per prompt (bars) and the routes themselves (prompt x layer map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = result.layer_mask
    fig, (bars, grid) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    kept = mask.sum(1).tolist()
    bars.bar(range(len(kept)), kept, color="C0")
    bars.axhline(result.num_layers, color="grey", ls="--", lw=1, label=f"all {result.num_layers} layers")
    bars.axhline(sum(kept) / len(kept), color="C3", lw=1,
                 label=f"mean {100 * result.mean_fraction:.1f}% of layers")
    bars.set_xlabel("prompt")
    bars.set_ylabel("layers run")
    bars.set_title(f"oracle: fewest layers with >= {result.min_agreement:g} of {result.max_new_tokens} greedy "
                   "tokens equal", fontsize=9)
    bars.legend(fontsize=8)
    grid.imshow(mask.T.float().numpy(), aspect="auto", cmap="Blues", interpolation="nearest", origin="lower")
    grid.set_xlabel("prompt")
    grid.set_ylabel("layer")
    grid.set_title("routes (dark: the layer runs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
