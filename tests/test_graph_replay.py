"""GraphReplay (skiplayers/patching/graph_replay.py): the protocol checks that run without a GPU; the
capture and replay themselves run in tests/test_static_decode.py on a GPU."""

from __future__ import annotations

import pytest

from skiplayers.patching.graph_replay import GraphReplay


def test_replaying_before_arming_is_refused():
    replay = GraphReplay()
    assert not replay.armed
    with pytest.raises(RuntimeError, match="arm"):
        replay(lambda: None)


def test_negative_warmup_is_refused():
    with pytest.raises(ValueError, match="warmup must be >= 0, got -1"):
        GraphReplay().arm(-1)
