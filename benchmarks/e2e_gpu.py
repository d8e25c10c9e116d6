"""End to end on a GPU, bf16, random weights of real model shapes: unpatched vs "auto" vs "ours",
decode eagerly and with the decode step in a CUDA graph.

Three variants of one model instance, interleaved round by round on the same inputs:

* ``unpatched``: the transformers model as loaded (``attn_implementation="sdpa"``);
* ``auto``: ``sk.patch(model, policy, backend=None)``: the default dispatch (standard attention
  patterns may go to torch's own kernels, the rest to skiplayers' kernels);
* ``ours``: ``sk.patch(model, policy, backend=B)`` with B forced to skiplayers' own kernels
  everywhere: ``"cuda"`` if the CUDA extension is built, else ``"triton"``; ``"cpu"`` on a CPU.

The policy is context stop at ℓ (``SkipPolicy(context_stop_layer=ℓ)``); ℓ = L (the number of
layers) stops nothing, so there the patched variants compute what the unpatched model computes and
their timing is the cost of the patch itself. Shapes (weights random, normal std 0.02, since none
can be downloaded): ``smollm2-135m`` (30 layers, 9/3 heads, D=64) and ``llama3-8b`` (32 layers,
32/8 heads, D=128); by default prefill runs on both and decode on ``llama3-8b``.

* **prefill**: one sequence of c context + q query tokens (context marked on columns 1..c), one
  forward with a fresh cache returning the last column's logits; median ms, speedup over unpatched,
  the token-layer bound 1 / (1 - (L - ℓ)/L * c/(c+q)) and speedup / bound (1.0 = all the skipped
  token-layers turned into time saved).
* **decode**, ``--decode-mode eager|graphs|both`` (default both; the graph cases run first):
  batch B of prompts of c context + 64 query tokens.

  - ``eager`` (mode ``eager``, all three variants): per round and variant the prompt is prefilled
    (timed too: ``prefill_ms``), 2 untimed greedy steps warm the decode path, then ``steps`` greedy
    single-token forwards (``model(...)``, host work in every step) are timed:
    ``decode_tok_s`` = B * steps / time.
  - ``graphs`` (mode ``graphs``; ``unpatched`` and ``ours``): what a user runs for a captured decode
    step. ``unpatched``: a transformers ``StaticCache`` sized prompt + steps, prefilled by the model,
    then the single-token forward over static input buffers recorded in a ``torch.cuda.CUDAGraph``
    (copy the token in, replay; :class:`StaticCacheDecoder`). ``ours``: the prefill writes a
    ``sk.SkipCache`` with a reserved pool (``max_tokens``: exactly the slots prompt + steps take under
    ℓ), then ``sk.StaticDecoder(model, cache, steps).capture()`` and replays, ``prepare()`` (host:
    pages, bookkeeping) before each. ``auto`` is not a separate variant here: the static step never
    dispatches, both patched variants run the backend's paged ``cache_attention`` (``ours``' kernels).
    Per variant: one prefill, the capture (2 warm steps), then ``--decode-rounds`` timed blocks of
    ``steps`` replays (median block; a replay is the same work every time, so blocks need no fresh
    prefill). Without CUDA (``--smoke`` on a CPU) the same static steps run without capture: mode
    ``static-eager``.

  ``host_ms_step``: host milliseconds to issue one step onto an idle device queue (synchronised
  before, not after; median of 2 steps per round after the warm ones): the CPU cost of a step. Where
  it is close to ``ms_step`` (the timed steps' time per step) decode is host-bound (expected for the
  eager rows of small models, and of large ones at batch 1); a graph step's host work is the copy-in
  and the replay launch (the patched side adds ``prepare()``), and it overlaps the previous replay,
  so eager vs graphs tokens/s of one (case, variant) is the host overhead in numbers. (On a CPU
  both are the whole step.)
* ``greedy_agree``: fraction of greedy tokens equal to the unpatched model's under the same mode
  (prefill: the first token; decode: every token of the last round, graphs: of the run). At ℓ = L it is a sanity check
  (1.0 expected in float32; bf16 may flip near-ties of a random model); at ℓ < L the tokens differ by
  design. ``agree_eager`` (graph rows): the same against the eager unpatched tokens of the same
  prompt, over the tokens both produced (the static-cache step must compute what the dynamic-cache
  one does; 1.0 expected in float32 for ``unpatched`` at every ℓ, and for ``ours`` at ℓ = L).

Every call is bracketed by ``torch.cuda.synchronize()``; ``peak_mem_gib`` is the largest
``torch.cuda.max_memory_allocated`` over a variant's calls. A variant that raises (out of memory, a
backend not built, a capture that fails) gets the error in its row and the run goes on. Cases run in
order (prefill of every shape, then decode: graph cases, then eager ones, cheapest first) until
``--budget-s`` is spent; the rest are listed as skipped.

    python -m benchmarks.e2e_gpu [--out DIR] [--budget-s 300] [--decode-mode both] [--shapes ...] ...
    python -m benchmarks.e2e_gpu --smoke --out /tmp/e2e_smoke   # tiny float32 model, any device, seconds

Writes ``benchmarks/results/e2e_gpu.{json,csv,png}`` (``--smoke``: a temporary directory) and
copies them to ``--out``.

Reading the table printed at the end: one line per (case, mode, variant). ``speedup`` is over the
unpatched line of the same case and mode (prefill: time ratio; decode: tokens/s ratio); ``bound``
and ``sp/bound`` are prefill only: how much of the token-layer saving became time (at ℓ = L the bound
is 1 and ``speedup`` below 1 is the patch's overhead). ``auto`` faster than ``ours`` means the
dispatch to torch's kernels paid off. Empty cells: not measured for that kind, or the variant
failed (``error``).

Known cost of the unpatched graph baseline: transformers' SDPA attention repeats K/V heads for
grouped-query attention whenever it is given a mask (5.17: ``repeat_kv`` unless the mask is None;
5.23 folds the query heads instead), and a static cache always passes one (the slots past the
current length are masked). So on transformers 5.17 the unpatched graph step copies the K/V of its
whole static cache per layer and step: at long contexts and batch 8 the graph baseline may be slower
than the eager one, which is what a user of that version gets, not a property of CUDA graphs.
"""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import skiplayers as sk
from benchmarks.common import RESULTS, arg_parser, pyplot, save_figure, write_results
from benchmarks.timing import interleaved_medians, timed
from skiplayers.cache import DEFAULT_PAGE_SIZE
from skiplayers.measure import greedy_step, token_layer_bound
from skiplayers.ops import cuda_kernels_built
from skiplayers.patching.graph_replay import GraphReplay

STEM = "e2e_gpu"
VARIANTS = ("unpatched", "auto", "ours")  # prefill and eager decode
# Captured decode: "auto" would run the same static step as "ours" (StaticDecoder never dispatches).
STATIC_VARIANTS = ("unpatched", "ours")
DECODE_MODES = ("eager", "graphs", "both")
# Real models' shapes. max_position_embeddings is raised for SmolLM2 (8192 in the real one) so that
# the 16k decode contexts fit; with random weights RoPE simply runs further.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=32768),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=32768),
    # head_dim 64: the smallest the CUDA kernels take, so that --smoke also runs on a GPU (captures included).
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=512),
}
# Stop layers per shape; "L" is the number of layers (no skipping: the patch's own cost).
DEFAULT_STOPS = {"smollm2-135m": ["10", "L"], "llama3-8b": ["14", "L"], "tiny": ["2", "L"]}
WARM_DECODE_STEPS = 2  # untimed greedy steps after each decode-case prefill (kernels, allocator; graphs: capture)
HOST_STEPS = 2  # steps after the warm ones whose host time is measured (host_ms_step)


# ----------------------------------------------------------------------------- models and inputs

def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    """A LlamaForCausalLM of ``SHAPES[shape]`` built directly on ``device`` in ``dtype``, weights
    normal(0, 0.02) (matrices and embeddings; norms stay 1), SDPA attention, eval mode."""
    config = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa", pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype, on device: no fp32 copy on the host
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:  # whatever init ran, make it a known, well-scaled one (no NaN softmax)
                torch.nn.init.normal_(param, std=0.02)
    return model.eval()


def prompt_batch(batch: int, context: int, query: int, vocab: int, device, seed: int):
    """``batch`` prompts of ``context + query`` random tokens, no padding; ``context_mask`` marks
    columns 1..context (column 0 stays a non-context token, as a BOS would).

    Returns ``input_ids`` [B, T] long, ``attention_mask`` [B, T] long (ones), ``context_mask`` [B, T]
    bool, with T = context + query."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, context + query), generator=gen)
    ctx = torch.zeros_like(ids, dtype=torch.bool)
    ctx[:, 1 : context + 1] = True
    return ids.to(device), torch.ones_like(ids).to(device), ctx.to(device)


def forced_backend(device: torch.device) -> str:
    """The backend of "ours": skiplayers' own kernels for ``device``."""
    if device.type == "cuda":
        return "cuda" if cuda_kernels_built() else "triton"
    return "cpu"


def use_variant(model, variant: str, policy: sk.SkipPolicy, device: torch.device) -> None:
    """Puts ``model`` in the state of ``variant`` (patching replaces any previous patch)."""
    if variant == "unpatched":
        if sk.is_patched(model):
            sk.unpatch(model)
    else:
        sk.patch(model, policy, backend=None if variant == "auto" else forced_backend(device))


def resolve_stops(stops: list[str], layers: int) -> list[int]:
    """``["14", "L"]`` -> ``[14, layers]``; values above ``layers`` are dropped."""
    out = [layers if s.upper() == "L" else int(s) for s in stops]
    return list(dict.fromkeys(s for s in out if 0 <= s <= layers))


# ----------------------------------------------------------------------------- timing plumbing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn, device: torch.device):
    """``fn`` with the device queue drained before and after, so that a host timer around the
    result measures the device work of ``fn`` (and nothing queued earlier)."""
    def call():
        sync(device)
        out = fn()
        sync(device)
        return out

    return call


def free_memory(device: torch.device, collect: bool = True) -> None:
    """Returns freed device memory to the driver; ``collect`` first breaks reference cycles (slow:
    after errors and between models, not between rounds)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    # The allocator's counter is updated when work is queued, so reading it needs no sync.
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


class Guard:
    """Runs the calls of variants, recording each variant's first error (as a string: the exception
    and its frames, which may hold large tensors, are dropped) and skipping its later calls."""

    def __init__(self, device: torch.device):
        self.device = device
        self.errors: dict[str, str] = {}

    def wrap(self, name: str, fn):
        def call(*args):
            if name in self.errors:
                return None
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001  (any failure of one variant is recorded, not raised)
                self.errors[name] = f"{type(exc).__name__}: {exc}"[:400]
            free_memory(self.device)
            return None

        return call

    def before(self, fn):
        """A ``before(name)`` hook guarded per variant."""
        return lambda name: self.wrap(name, fn)(name)


def agreement(tokens: torch.Tensor | None, reference: torch.Tensor | None) -> float | None:
    """Fraction of equal entries of two token tensors (None if either is missing or the batches
    differ). Decode tokens ``[B, n]`` of runs of different lengths are compared over the first
    min(n) columns: greedy runs from one prompt produce the same prefix when their steps agree."""
    if tokens is None or reference is None or tokens.dim() != reference.dim() or tokens.shape[:1] != reference.shape[:1]:
        return None
    if tokens.dim() == 2:
        n = min(tokens.shape[1], reference.shape[1])
        tokens, reference = tokens[:, :n], reference[:, :n]
    if tokens.shape != reference.shape:
        return None
    return round((tokens == reference).float().mean().item(), 4)


def host_step_seconds(step, device: torch.device, count: int) -> list[float]:
    """Host seconds of ``count`` calls of ``step()``, each issued onto an idle device queue
    (synchronised before the call, not after it): what one step costs the CPU, whatever the device
    then takes. On a CPU, the whole step."""
    times = []
    for _ in range(count):
        sync(device)
        times.append(timed(step)[1])
    sync(device)
    return times


def static_mode(device: torch.device) -> str:
    """The mode name of the static decode steps on ``device``: captured in a CUDA graph on a GPU,
    run eagerly elsewhere (a CUDA graph needs CUDA; the steps are the same)."""
    return "graphs" if device.type == "cuda" else "static-eager"


# ----------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    kind: str  # "prefill" or "decode"
    shape: str
    batch: int
    context: int
    query: int
    stop: int
    mode: str = "eager"  # decode: "eager", or the static steps: "graphs" (CUDA) / "static-eager" (static_mode)

    def describe(self) -> str:
        mode = f" [{self.mode}]" if self.kind == "decode" else ""
        return f"{self.kind}{mode} {self.shape} B={self.batch} c={self.context} q={self.query} ℓ={self.stop}"

    @property
    def variants(self) -> tuple[str, ...]:
        return VARIANTS if self.mode == "eager" else STATIC_VARIANTS


@dataclass
class Measured:
    """What one case measured, per variant."""
    seconds: dict[str, float]  # median of the timed call
    tokens: dict[str, torch.Tensor]  # greedy tokens of the last call
    peaks: dict[str, float] = field(default_factory=dict)  # GiB
    prefill_s: dict[str, list[float]] = field(default_factory=dict)  # decode cases: their prefills
    host_s: dict[str, list[float]] = field(default_factory=dict)  # decode cases: host seconds per step


def measure_prefill(model, case: Case, args, device, guard: Guard) -> Measured:
    """Times one prefill forward (fresh cache, logits of the last column) per variant."""
    ids, attn, ctx = prompt_batch(case.batch, case.context, case.query, model.config.vocab_size, device, args.seed)
    policy = sk.SkipPolicy(context_stop_layer=case.stop)
    tokens: dict[str, torch.Tensor] = {}
    peaks: dict[str, float] = {}

    def before(name):
        use_variant(model, name, policy, device)
        reset_peak(device)

    def call(name):
        extra = {} if name == "unpatched" else {"context_mask": ctx}
        out = model(ids, attention_mask=attn, use_cache=True, logits_to_keep=1, **extra)
        tokens[name] = out.logits[:, -1].argmax(-1)  # [B]
        peaks[name] = max(peaks.get(name, 0.0), peak_gib(device) or 0.0)

    fns = {name: guard.wrap(name, synced(partial(call, name), device)) for name in VARIANTS}
    seconds = interleaved_medians(fns, args.rounds, args.warmup, before=guard.before(before))
    return Measured(seconds, tokens, peaks if device.type == "cuda" else {})


@dataclass
class Greedy:
    """A greedy decode in progress: the cache, the attention mask so far [B, T], the last token
    [B, 1] and all tokens produced."""
    cache: object
    mask: torch.Tensor
    token: torch.Tensor
    tokens: list[torch.Tensor]

    def step(self, model) -> None:
        """One single-token forward with the cache (``skiplayers.measure.greedy_step``)."""
        self.token, self.mask = greedy_step(model, self.token, self.mask, self.cache)
        self.tokens.append(self.token)


def measure_decode(model, case: Case, args, device, guard: Guard) -> Measured:
    """Per round and variant: prefill the prompt (untimed by the medians, recorded), warm up, then
    time ``args.steps`` greedy steps."""
    ids, attn, ctx = prompt_batch(case.batch, case.context, case.query, model.config.vocab_size, device, args.seed)
    policy = sk.SkipPolicy(context_stop_layer=case.stop)
    running: dict[str, Greedy] = {}
    tokens: dict[str, torch.Tensor] = {}
    peaks: dict[str, float] = {}
    prefill_s: dict[str, list[float]] = {name: [] for name in VARIANTS}
    host_s: dict[str, list[float]] = {name: [] for name in VARIANTS}

    def before(name):
        running.clear()  # the previous variant's cache goes before this one's is built
        free_memory(device, collect=False)
        use_variant(model, name, policy, device)
        reset_peak(device)
        extra = {} if name == "unpatched" else {"context_mask": ctx}
        prefill = synced(lambda: model(ids, attention_mask=attn, use_cache=True, logits_to_keep=1, **extra), device)
        out, seconds = timed(prefill)
        prefill_s[name].append(seconds)
        first = out.logits[:, -1].argmax(-1, keepdim=True)
        run = Greedy(out.past_key_values, attn, first, [first])
        del out
        for _ in range(WARM_DECODE_STEPS):
            run.step(model)
        host_s[name].extend(host_step_seconds(partial(run.step, model), device, HOST_STEPS))
        running[name] = run

    def call(name):
        run = running[name]
        for _ in range(args.steps):
            run.step(model)
        tokens[name] = torch.cat(run.tokens, dim=1)  # [B, 1 + warm + steps]
        peaks[name] = max(peaks.get(name, 0.0), peak_gib(device) or 0.0)

    fns = {name: guard.wrap(name, synced(partial(call, name), device)) for name in VARIANTS}
    seconds = interleaved_medians(fns, args.decode_rounds, warmup=0, before=guard.before(before))
    running.clear()
    return Measured(seconds, tokens, peaks if device.type == "cuda" else {}, prefill_s, host_s)


class StaticCacheDecoder:
    """The unpatched model's decode step over a prefilled transformers ``StaticCache``, as a
    transformers user captures it: the single-token forward reads static buffers only (the token
    int64 ``[B, 1]``, the position ids ``[B, 1]``, an all-ones attention mask ``[B, max_cache_len]``)
    and writes the cache in place, so it can be recorded once in a ``torch.cuda.CUDAGraph`` and
    replayed. transformers 5.x takes no ``cache_position``: a StaticCache layer writes at its own
    device counter (``cumulative_length``) and builds the mask from it, so the positions are the only
    input that changes (advanced on the device inside the step).

    ``prompt_length``: columns the prefill wrote (prompts without padding: every sequence's next
    position). ``decoder(tokens)`` runs one step and returns the logits ``[B, 1, vocab]`` (after
    :meth:`capture`, the graph's output buffer: read it before the next call). The protocol is
    ``sk.StaticDecoder``'s (both use ``GraphReplay``), so that both sides are captured and timed
    alike: after :meth:`capture` the first ``warmup`` calls run eagerly on a side stream, the next
    one records the step and replays it, later ones replay.

    Why ``torch.cuda.CUDAGraph`` of the eager forward and not ``torch.compile(mode="reduce-overhead")``:
    the patched side is captured this way (``StaticDecoder.capture``, no compiler), so the two sides
    then differ in the step's work alone, not in what a compiler fused on one side (inductor would
    also fuse the unpatched model's norms, RoPE and MLP elementwise ops); and a budgeted run cannot
    spend the compile time of each (shape, batch).
    """

    def __init__(self, model, cache: StaticCache, batch: int, prompt_length: int, max_cache_len: int):
        device = model.lm_head.weight.device
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.position_ids = torch.full((batch, 1), prompt_length, dtype=torch.int64, device=device)
        # What generate() passes with a static cache: every slot may be attended; the causal mask
        # transformers builds from the cache's counter hides the slots not written yet.
        self.attention_mask = torch.ones(batch, max_cache_len, dtype=torch.int64, device=device)
        self._remaining = max_cache_len - prompt_length
        self._replay = GraphReplay()

    def step(self) -> torch.Tensor:
        """One decode step on the device over the static buffers: logits ``[B, 1, vocab]``."""
        out = self.model(self.tokens, attention_mask=self.attention_mask, position_ids=self.position_ids,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.position_ids.add_(1)
        return out.logits

    def capture(self, warmup: int = 1) -> None:
        """Records the step in a CUDA graph at the call after ``warmup`` eager ones (CUDA only)."""
        if self.tokens.device.type != "cuda":
            raise NotImplementedError("a CUDA graph needs the model on a CUDA device")
        self._replay.arm(warmup)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._remaining == 0:  # the cache's index_copy_ would write past its slots
            raise RuntimeError("StaticCacheDecoder: the StaticCache is full")
        self._remaining -= 1
        self.tokens.copy_(tokens)
        if not self._replay.armed:
            return self.step()
        return self._replay(self.step)


def skip_cache_slots(layers: int, stop: int, batch: int, context: int, query: int, new_tokens: int,
                     page_size: int) -> int:
    """Slots a SkipCache pool needs (``SkipCache(max_tokens=...)``) for ``batch`` prompts of
    ``context`` context + ``query`` other tokens and ``new_tokens`` decode steps under context stop
    at ``stop``: layers < ℓ store every token, layers >= ℓ all but the context ones; each (layer,
    sequence) holds whole pages. Exact, so that the reserved pool is the memory the policy needs."""
    pages = sum(-(-((context if layer < stop else 0) + query + new_tokens) // page_size) for layer in range(layers))
    return batch * pages * page_size


def measure_decode_static(model, case: Case, args, device, guard: Guard) -> Measured:
    """The static decode steps (``case.mode`` "graphs": captured; "static-eager": the same steps
    run eagerly), variant after variant: prefill into a static cache (timed, recorded), the decoder
    (capture, ``WARM_DECODE_STEPS`` steps), ``HOST_STEPS`` host-timed steps, then
    ``args.decode_rounds`` timed blocks of ``args.steps`` steps; ``seconds`` is the median block."""
    ids, attn, ctx = prompt_batch(case.batch, case.context, case.query, model.config.vocab_size, device, args.seed)
    policy = sk.SkipPolicy(context_stop_layer=case.stop)
    layers = model.config.num_hidden_layers
    prompt = case.context + case.query
    calls = WARM_DECODE_STEPS + HOST_STEPS + args.decode_rounds * args.steps  # decode steps, each one slot
    measured = Measured({}, {}, {}, {}, {})

    def run(name):
        # The previous variant's cache and graph go first (collected: a cache and the step object it
        # was last given may hold each other), so that two caches of 16 GiB never coexist.
        free_memory(device)
        use_variant(model, name, policy, device)
        reset_peak(device)
        if name == "unpatched":
            cache, extra = StaticCache(config=model.config, max_cache_len=prompt + calls), {}
        else:
            slots = skip_cache_slots(layers, case.stop, case.batch, case.context, case.query, calls, DEFAULT_PAGE_SIZE)
            cache, extra = sk.SkipCache(layers, page_size=DEFAULT_PAGE_SIZE, max_tokens=slots), {"context_mask": ctx}
        prefill = synced(lambda: model(ids, attention_mask=attn, past_key_values=cache, use_cache=True,
                                       logits_to_keep=1, **extra), device)
        out, seconds = timed(prefill)
        measured.prefill_s[name] = [seconds]
        produced = [out.logits[:, -1].argmax(-1, keepdim=True)]  # [B, 1] each
        del out
        if name == "unpatched":
            decoder = StaticCacheDecoder(model, cache, case.batch, prompt, prompt + calls)
        else:
            decoder = sk.StaticDecoder(model, cache, max_new_tokens=calls)
        if case.mode == "graphs":
            decoder.capture(warmup=1)  # the first warm step runs eagerly, the second records and replays

        def step():
            produced.append(decoder(produced[-1]).argmax(-1))

        for _ in range(WARM_DECODE_STEPS):
            step()
        measured.host_s[name] = host_step_seconds(step, device, HOST_STEPS)

        def block():
            for _ in range(args.steps):
                step()

        blocks = [timed(synced(block, device))[1] for _ in range(args.decode_rounds)]
        measured.seconds[name] = statistics.median(blocks)
        measured.tokens[name] = torch.cat(produced, dim=1)  # [B, 1 + calls]
        if device.type == "cuda":
            measured.peaks[name] = peak_gib(device) or 0.0

    for name in STATIC_VARIANTS:
        guard.wrap(name, run)(name)
    free_memory(device)
    return measured


def case_rows(case: Case, layers: int, measured: Measured | None, guard: Guard, device, args,
              backends: dict[str, str | None]) -> list[dict]:
    """One row per variant of a case (``measured`` None: the case failed before any variant ran).
    Decode rows carry their greedy tokens as ``_tokens`` until ``fill_eager_agreement`` removes them."""
    base = dict(kind=case.kind, mode=case.mode, shape=case.shape, layers=layers, batch=case.batch,
                context=case.context, query=case.query, stop_layer=case.stop)
    errors = guard.errors
    ok = {name: measured is not None and name not in errors for name in case.variants}
    rows = []
    for name in case.variants:
        row = dict(base, variant=name, backend=backends.get(name))
        secs = measured.seconds[name] if ok[name] else None
        ref = measured.seconds["unpatched"] if ok["unpatched"] else None
        if case.kind == "prefill":
            bound = token_layer_bound([case.context] * case.batch, [case.context + case.query] * case.batch, layers,
                                      case.stop)
            speedup = ref / secs if secs and ref else None
            row.update(prefill_ms=_round(secs and secs * 1e3, 3), speedup=_round(speedup, 3),
                       token_layer_bound=round(bound, 3), speedup_over_bound=_round(speedup and speedup / bound, 3))
        else:
            prefills = measured.prefill_s.get(name) if ok[name] else None
            hosts = measured.host_s.get(name) if ok[name] else None
            row.update(steps=args.steps, decode_tok_s=_round(secs and case.batch * args.steps / secs, 2),
                       speedup=_round(ref / secs if secs and ref else None, 3),
                       ms_step=_round(secs and secs / args.steps * 1e3, 3),
                       host_ms_step=_round(hosts and statistics.median(hosts) * 1e3, 3),
                       prefill_ms=_round(prefills and statistics.median(prefills) * 1e3, 2))
            if case.mode != "eager":
                row["agree_eager"] = None  # fill_eager_agreement, once the eager cases have run
            row["_tokens"] = measured.tokens.get(name) if ok[name] else None
        tokens = measured.tokens if measured is not None and ok[name] and ok["unpatched"] else {}
        row["greedy_agree"] = agreement(tokens.get(name), tokens.get("unpatched"))
        row["peak_mem_gib"] = _round(measured.peaks.get(name) if ok[name] else None, 2)
        row["error"] = errors.get(name, "")
        rows.append(row)
    return rows


def _round(x, digits):
    return None if x is None else round(x, digits)


def fill_eager_agreement(rows: list[dict]) -> None:
    """Sets ``agree_eager`` of the static-step decode rows: their greedy tokens against those of the
    eager unpatched row of the same prompt (shape, batch, context: ℓ does not change the unpatched
    model), over the tokens both produced; None without such a row. Removes every row's ``_tokens``."""
    eager = {(r["shape"], r["batch"], r["context"]): r["_tokens"] for r in rows
             if r["kind"] == "decode" and r["mode"] == "eager" and r["variant"] == "unpatched"
             and r.get("_tokens") is not None}
    for row in rows:
        tokens = row.pop("_tokens", None)
        if "agree_eager" in row:
            row["agree_eager"] = agreement(tokens, eager.get((row["shape"], row["batch"], row["context"])))


# ----------------------------------------------------------------------------- the run

class Models:
    """Holds the model of one shape at a time (built on first use; the previous one is freed
    first, so two 8B models never coexist). Records each shape's dispatch report, if any."""

    def __init__(self, args, device, dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.shape, self.model = None, None
        self.reports: dict[str, str] = {}
        self.build_s: dict[str, float] = {}

    def get(self, shape: str):
        if shape != self.shape:
            self.shape, self.model = None, None
            free_memory(self.device)
            start = time.perf_counter()
            self.model = build_model(shape, self.device, self.dtype, self.args.seed)
            sync(self.device)
            self.build_s[shape] = round(time.perf_counter() - start, 2)
            self.shape = shape
            self._report(shape)
        return self.model

    def _report(self, shape: str) -> None:
        # The dispatch report only exists with backend="auto" support; print it once per shape.
        if not hasattr(sk, "dispatch_report") or shape in self.reports:
            return
        model = self.model
        try:
            sk.patch(model, sk.SkipPolicy(context_stop_layer=model.config.num_hidden_layers), backend=None)
            report = sk.dispatch_report(model)
            print(report)
            self.reports[shape] = str(report)
        except Exception as exc:  # noqa: BLE001
            self.reports[shape] = f"dispatch_report failed: {type(exc).__name__}: {exc}"
        finally:
            if sk.is_patched(model):
                sk.unpatch(model)


def plan_cases(args, device: torch.device) -> list[Case]:
    """Prefill cases of every shape, then decode cases: the static-step (graph) cases of every
    shape first, then the eager ones (each an order of magnitude dearer: a prefill per round and
    variant), cheapest first within a (mode, shape) (the budget cuts the most expensive ones)."""
    cases = []
    for shape in args.shapes:
        layers = SHAPES[shape]["num_hidden_layers"]
        for stop in resolve_stops(args.stops or DEFAULT_STOPS[shape], layers):
            cases.append(Case("prefill", shape, 1, args.context, args.query, stop))
    modes = {"eager": ["eager"], "graphs": [static_mode(device)], "both": [static_mode(device), "eager"]}
    for mode in modes[args.decode_mode]:
        for shape in args.decode_shapes:
            layers = SHAPES[shape]["num_hidden_layers"]
            for batch in args.batches:
                for context in args.contexts:
                    for stop in resolve_stops(args.stops or DEFAULT_STOPS[shape], layers):
                        cases.append(Case("decode", shape, batch, context, args.decode_query, stop, mode))
    return cases


def run_case(case: Case, models: Models, args, device) -> list[dict]:
    guard = Guard(device)
    layers = SHAPES[case.shape]["num_hidden_layers"]
    backends = {"unpatched": None, "auto": "auto (backend=None)", "ours": forced_backend(device)}
    measured = None
    try:
        model = models.get(case.shape)
        if case.kind == "prefill":
            measure = measure_prefill
        else:
            measure = measure_decode if case.mode == "eager" else measure_decode_static
        measured = measure(model, case, args, device, guard)
    except Exception as exc:  # noqa: BLE001  (e.g. the model does not fit: every variant gets the error)
        for name in case.variants:
            guard.errors.setdefault(name, f"{type(exc).__name__}: {exc}"[:400])
        models.shape, models.model = None, None
        free_memory(device)
    finally:
        if models.model is not None and sk.is_patched(models.model):
            sk.unpatch(models.model)
    return case_rows(case, layers, measured, guard, device, args, backends)


def summary_line(rows: list[dict]) -> str:
    by = {r["variant"]: r for r in rows}
    r0 = rows[0]
    kind = r0["kind"] if r0["kind"] == "prefill" else f"decode[{r0['mode']}]"
    head = f"{kind:7} {r0['shape']:12} B={r0['batch']} c={r0['context']:5} ℓ={r0['stop_layer']:2}:"
    key = "prefill_ms" if r0["kind"] == "prefill" else "decode_tok_s"
    unit = "ms" if r0["kind"] == "prefill" else "tok/s"
    parts = []
    for name in by:
        r = by[name]
        parts.append(f"{name} ERROR" if r["error"] else f"{name} {r[key]} {unit}" +
                     (f" (x{r['speedup']})" if name != "unpatched" and r["speedup"] else ""))
    extra = f", bound x{r0['token_layer_bound']}" if r0["kind"] == "prefill" else ""
    return f"{head} " + ", ".join(parts) + extra


TABLE_COLUMNS = [("kind", 7), ("mode", 12), ("shape", 12), ("batch", 3), ("context", 6), ("stop_layer", 3),
                 ("variant", 9), ("prefill_ms", 10), ("decode_tok_s", 12), ("speedup", 7), ("ms_step", 8),
                 ("host_ms_step", 8), ("token_layer_bound", 6), ("speedup_over_bound", 8), ("greedy_agree", 6),
                 ("agree_eager", 6), ("peak_mem_gib", 8), ("error", 0)]
TABLE_HEADERS = {"stop_layer": "ℓ", "context": "c", "batch": "B", "decode_tok_s": "decode tok/s",
                 "ms_step": "ms/step", "host_ms_step": "host ms", "token_layer_bound": "bound",
                 "speedup_over_bound": "sp/bound", "greedy_agree": "agree", "agree_eager": "~eager",
                 "peak_mem_gib": "peak GiB"}


def format_table(rows: list[dict]) -> str:
    """One line per row; empty cells for columns a row does not have."""
    def cell(value, width):
        text = "" if value is None else str(value)
        return text[:120] if width == 0 else text.rjust(width) if isinstance(value, (int, float)) else text.ljust(width)

    lines = ["  ".join(cell(TABLE_HEADERS.get(k, k), w) for k, w in TABLE_COLUMNS)]
    for row in rows:
        lines.append("  ".join(cell(row.get(k), w) for k, w in TABLE_COLUMNS).rstrip())
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Left: prefill speedup of auto and ours per (shape, ℓ), the token-layer bound as a marker.
    Then one panel per (decode shape, mode): tokens/s over context, one line per (variant, batch, ℓ);
    the panels of one shape share their y axis, so that eager and graphs compare by eye."""
    plt = pyplot()
    prefill = [r for r in rows if r["kind"] == "prefill"]
    panels = list(dict.fromkeys((r["shape"], r["mode"]) for r in rows if r["kind"] == "decode"))
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(6 * (1 + len(panels)), 4.5), squeeze=False)
    ax = axes[0][0]
    groups = list(dict.fromkeys((r["shape"], r["stop_layer"]) for r in prefill))
    for j, name in enumerate(("auto", "ours")):
        ys = [next((r["speedup"] for r in prefill if (r["shape"], r["stop_layer"]) == g and r["variant"] == name), None)
              for g in groups]
        ax.bar([i + (j - 0.5) * 0.38 for i in range(len(groups))], [y or 0 for y in ys], width=0.38,
               color=f"C{j + 1}", label=name)
    bounds = [next(r["token_layer_bound"] for r in prefill if (r["shape"], r["stop_layer"]) == g) for g in groups]
    ax.plot(range(len(groups)), bounds, "k_", markersize=30, mew=2, label="token-layer bound")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(groups)), [f"{s}\nℓ={l}" for s, l in groups], fontsize=8)
    ax.set(title="prefill speedup vs unpatched", ylabel="speedup (x)")
    ax.legend(fontsize=7)
    batches = sorted({r["batch"] for r in rows if r["kind"] == "decode"})
    styles = dict(zip(batches, ["-", "--", ":", "-."] * len(batches)))
    for k, (shape, mode) in enumerate(panels, start=1):
        ax = axes[0][k]
        sel = [r for r in rows if r["kind"] == "decode" and r["shape"] == shape and r["mode"] == mode]
        for key in dict.fromkeys((r["variant"], r["batch"], r["stop_layer"]) for r in sel):
            line = sorted((r for r in sel if (r["variant"], r["batch"], r["stop_layer"]) == key and r["decode_tok_s"]),
                          key=lambda r: r["context"])
            if line:
                name, batch, stop = key
                ax.plot([r["context"] for r in line], [r["decode_tok_s"] for r in line],
                        marker="o" if stop < line[0]["layers"] else "s", ls=styles[batch],
                        color=f"C{VARIANTS.index(name)}", label=f"{name} B={batch} ℓ={stop}")
        ax.set(title=f"decode, {shape}, {mode}", xlabel="context tokens", ylabel="tokens/s", xscale="log",
               yscale="log")
        if ax.lines:
            ax.legend(fontsize=6, ncol=2)
    for shape in dict.fromkeys(shape for shape, _ in panels):
        same = [axes[0][k] for k, (s, _) in enumerate(panels, start=1) if s == shape and axes[0][k].lines]
        if len(same) > 1:
            low = min(ax.get_ylim()[0] for ax in same)
            high = max(ax.get_ylim()[1] for ax in same)
            for ax in same:
                ax.set_ylim(low, high)
    fig.suptitle(title)
    save_figure(fig, path)


def parse_args(argv):
    parser = arg_parser(__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama3-8b"], choices=list(SHAPES),
                        help="shapes of the prefill cases")
    # SmolLM2's decode is host-bound (launch overhead) and would cost another ~75 s by default.
    parser.add_argument("--decode-shapes", nargs="+", default=["llama3-8b"], choices=list(SHAPES),
                        help="shapes of the decode cases (add smollm2-135m for a host-bound one)")
    parser.add_argument("--stops", nargs="+", default=None,
                        help="context stop layers (ints, 'L' = no skipping); default per shape: " +
                        ", ".join(f"{k} {' '.join(v)}" for k, v in DEFAULT_STOPS.items()))
    parser.add_argument("--context", type=int, default=2000, help="prefill: context tokens")
    parser.add_argument("--query", type=int, default=200, help="prefill: query tokens")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384], help="decode: context tokens")
    parser.add_argument("--decode-query", type=int, default=64, help="decode: query tokens of the prompt")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    parser.add_argument("--decode-mode", default="both", choices=DECODE_MODES,
                        help="decode steps: eager (model(...) per token), graphs (static cache, the step in a CUDA "
                        "graph; run eagerly without CUDA), or both (graph cases first)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="timed prefill rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed prefill rounds")
    parser.add_argument("--decode-rounds", type=int, default=3,
                        help="decode rounds (eager: each prefills anew; graphs: timed blocks after one prefill)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip the cases left after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also copy the result files to this directory")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny float32 model and sizes, results to a temporary directory: a check in seconds")
    if parser.parse_known_args(argv)[0].smoke:
        # Tiny sizes become the defaults; options given explicitly still win.
        parser.set_defaults(dtype="float32", shapes=["tiny"], decode_shapes=["tiny"], context=24, query=8,
                            contexts=[32, 64], decode_query=8, batches=[1, 2], steps=3, rounds=1, warmup=1,
                            decode_rounds=1)
    args = parser.parse_args(argv)
    return args


def run_cases(cases: list[Case], args, device, dtype) -> tuple[list[dict], list[str], Models]:
    """Runs ``cases`` in order until the budget is spent. Returns the rows, the descriptions of the
    cases skipped for the budget, and the model holder (build times, dispatch reports)."""
    models = Models(args, device, dtype)
    rows, skipped = [], []
    start = time.perf_counter()
    with torch.no_grad(), tqdm(cases, desc="e2e", unit="case") as bar:
        for case in bar:
            if time.perf_counter() - start > args.budget_s:
                skipped.append(case.describe())
                continue
            bar.set_postfix_str(case.describe())
            case_result = run_case(case, models, args, device)
            rows.extend(case_result)
            bar.write(f"[{time.perf_counter() - start:6.1f} s] {summary_line(case_result)}")
    fill_eager_agreement(rows)
    models.shape = models.model = None
    free_memory(device)
    return rows, skipped, models


def save(rows: list[dict], meta: dict, directory: Path, out: str | None, title: str) -> Path:
    """JSON and CSV (``common.write_results``) and the PNG in ``directory``, copied to ``out``.
    Returns the JSON's path (in ``out`` when given)."""
    json_path, csv_path = write_results(STEM, rows, meta, directory)
    paths = [json_path, csv_path]
    if rows:
        plot(rows, directory / f"{STEM}.png", title)
        paths.append(directory / f"{STEM}.png")
    print("wrote " + ", ".join(map(str, paths)))
    if out is None:
        return json_path
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        if path.exists() and path.resolve() != (out / path.name).resolve():
            shutil.copy(path, out / path.name)
    print(f"copied to {out}")
    return out / json_path.name


def main(argv=None) -> Path:
    """Runs the benchmark; returns the path of the JSON written."""
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    threads = torch.get_num_threads()
    if args.smoke and device.type == "cpu":
        # The smoke run checks plumbing, not speed; on shared cores, OpenMP threads spinning against
        # other processes make tiny calls 100x slower.
        torch.set_num_threads(1)
    try:
        cases = plan_cases(args, device)
        start = time.perf_counter()
        rows, skipped, models = run_cases(cases, args, device, dtype)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    if skipped:
        print(f"budget of {args.budget_s:.0f} s spent: skipped {len(skipped)} of {len(cases)} cases:\n  " +
              "\n  ".join(skipped))
    meta = dict(args=vars(args), dtype=args.dtype, device=str(device), ours_backend=forced_backend(device),
                decode_mode=args.decode_mode, static_mode=static_mode(device),
                elapsed_s=round(elapsed, 1), budget_s=args.budget_s, skipped_cases=skipped,
                model_build_s=models.build_s, dispatch_report=models.reports or None)
    print(format_table(rows))
    print(f"elapsed {elapsed:.1f} s" + (f", {len(skipped)} cases skipped (budget)" if skipped else ""))
    directory = Path(tempfile.mkdtemp(prefix="e2e_gpu_smoke_")) if args.smoke else RESULTS
    return save(rows, meta, directory, args.out,
                f"random-weight LLaMA shapes, {args.dtype}, {device.type}: unpatched vs auto vs ours "
                f"(decode: {args.decode_mode})")


if __name__ == "__main__":
    main()
