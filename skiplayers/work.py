"""What a patched model computed: layer-row work per forward call, and early exits.

Each patched forward call appends one :class:`CallWork` to its model's log (``PatchState.work``);
:func:`work_report` sums the log. The bound a call's time should follow is its layer-row work: the
rows each layer computed, summed over layers, against rows x layers of the unpatched model (context
stop, layer skipping and early exit all lower it; attention dropping does not, its layers still run
their MLP).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CallWork:
    """One forward call. ``rows``: real tokens fed; ``row_layers``: rows computed, summed over the
    layers; ``full_row_layers``: rows x layers (the unpatched work). With early exit: ``exit_rows``
    rows could exit (decode rows), ``exits`` did, ``exit_layer_sum`` sums, over the ``exit_rows``,
    the last layer each computed (L - 1 for rows that did not exit)."""

    rows: int
    row_layers: int
    full_row_layers: int
    exit_rows: int = 0
    exits: int = 0
    exit_layer_sum: int = 0

    @property
    def fraction_saved(self) -> float:
        """Fraction of the layer-row work not done (0 when nothing was computed)."""
        return 1.0 - self.row_layers / self.full_row_layers if self.full_row_layers else 0.0

    @property
    def mean_exit_layer(self) -> float | None:
        return self.exit_layer_sum / self.exit_rows if self.exit_rows else None


@dataclass(frozen=True)
class WorkReport(CallWork):
    """The logged calls' figures summed (see :func:`work_report`): a :class:`CallWork` over all of
    them, so its ``fraction_saved`` and ``mean_exit_layer`` (over the rows that could exit; None when
    none could) are those of the sums; ``per_call`` keeps each call's own figures."""

    calls: int = 0
    per_call: tuple[CallWork, ...] = ()

    @property
    def exit_rate(self) -> float | None:
        return self.exits / self.exit_rows if self.exit_rows else None

    def __str__(self) -> str:
        text = (f"{self.calls} calls, {self.rows} rows: {self.row_layers} of {self.full_row_layers} layer-rows computed "
                f"({100 * self.fraction_saved:.1f}% saved)")
        if self.exit_rows:
            text += (f"; early exit: {self.exits} of {self.exit_rows} decode rows exited, mean exit layer "
                     f"{self.mean_exit_layer:.2f}")
        return text


def summarise(log: list[CallWork]) -> WorkReport:
    return WorkReport(
        rows=sum(c.rows for c in log), row_layers=sum(c.row_layers for c in log),
        full_row_layers=sum(c.full_row_layers for c in log), exit_rows=sum(c.exit_rows for c in log),
        exits=sum(c.exits for c in log), exit_layer_sum=sum(c.exit_layer_sum for c in log),
        calls=len(log), per_call=tuple(log),
    )


def work_report(model, reset: bool = False) -> WorkReport:
    """The layer-row work of the forward calls of a patched ``model`` since it was patched (or
    since the last ``reset=True``), e.g. after a ``generate()``."""
    state = getattr(model, "_skiplayers", None)
    if state is None:
        raise ValueError("this model is not patched by skiplayers")
    report = summarise(state.work)
    if reset:
        state.work.clear()
    return report
