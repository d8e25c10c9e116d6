"""Attention dispatch: each attention call of a patched model goes to the fastest kernel that can
compute its pattern.

* ``patterns.py``: the classifier (standard patterns vs the visibility predicate), from host facts;
* ``kernels.py``: the kernels behind one interface (ours, SDPA, ``varlen_attn``);
* ``table.py``: per device, the measured choice per pattern, dtype, head dim and size band;
* ``dispatcher.py``: the per-model object that classifies, chooses, runs and counts;
* ``report.py``: :func:`dispatch_report`, what runs and why;
* ``tune.py``: measures a device and writes its table (``python -m skiplayers.dispatch.tune``).
"""

from .patterns import Pattern
from .report import DispatchReport, dispatch_report
from .table import Table, use_table

__all__ = ["DispatchReport", "Pattern", "Table", "dispatch_report", "use_table"]
