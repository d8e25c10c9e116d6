"""The CUDA-graph protocol of the decode steps (``StaticDecoder``, and the unpatched model's step
of ``benchmarks/e2e_gpu.py``, so that both sides of a comparison are captured alike)."""

from __future__ import annotations

from collections.abc import Callable

import torch


class GraphReplay:
    """Records a device step in a ``torch.cuda.CUDAGraph`` and replays it.

    Once :meth:`arm` has been called, each call ``replay(step)`` runs: the first ``warmup`` times,
    ``step()`` eagerly on a side stream (what CUDA graphs need before a capture: lazy allocations and
    kernel selection happen outside the graph); the next time, records ``step()`` into the graph (a
    recording runs nothing) and replays it; every later time, replays the graph without calling
    ``step``. ``step`` must read and write only static buffers (the same tensors every call); the
    returned tensor is the graph's output buffer, overwritten by the next replay.
    """

    def __init__(self) -> None:
        self._graph: torch.cuda.CUDAGraph | None = None
        self._output: torch.Tensor | None = None
        self._warmup = 0

    @property
    def armed(self) -> bool:
        return self._graph is not None

    def arm(self, warmup: int) -> None:
        """Capture at the call after ``warmup`` eager ones (CUDA only; the caller checks the device)."""
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self._graph, self._warmup, self._output = torch.cuda.CUDAGraph(), warmup, None

    def __call__(self, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._graph is None:
            raise RuntimeError("GraphReplay: arm() it before replaying")
        if self._warmup > 0:
            self._warmup -= 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                eager = step()
            torch.cuda.current_stream().wait_stream(stream)
            return eager
        if self._output is None:
            with torch.cuda.graph(self._graph):
                self._output = step()
        self._graph.replay()
        return self._output
