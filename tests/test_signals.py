"""Signals are declared (issue 42): every pruner names what it reads from the one table in engine/signals.py, a new
pruner that reads a recorded signal runs with no engine edit, and a typo or an old class flag fails at once."""
import os

import pytest
import torch

from tokensieve.engine import signals
from tokensieve.pruners import REGISTRY, Pruner, Selection, topk_sorted
from tokensieve.pruners.base import Signals

SCENE = os.path.join(os.path.dirname(__file__), "..", "examples", "scene.png")


def test_every_registered_pruner_declares_known_signals():
    for name, cls in REGISTRY.items():
        assert signals.declared(cls()).reads <= set(signals.SIGNALS), name
    assert signals.declared(REGISTRY["fastv"]()).reads == {"llm.last_query"}


def make_pruner(name: str, reads: Signals):
    class LastQueryTopK(Pruner):
        """Keeps the visual tokens the last prompt token attends to most (head mean): FastV's rule, written anew."""

        wheres = ("llm",)
        default_where = "llm"
        default_layer = 2
        signals = reads

        def select(self, inp) -> Selection:
            seen.append(tuple(inp.attn.shape))
            return Selection(keep_idx=topk_sorted(inp.attn.float().mean(0), inp.keep))

    LastQueryTopK.name = name
    seen: list = []
    return LastQueryTopK, seen


def test_a_new_pruner_reading_a_recorded_signal_needs_no_engine_edit(monkeypatch, engine_for):
    cls, seen = make_pruner("lastq", Signals("llm.last_query"))
    monkeypatch.setitem(REGISTRY, "lastq", cls)
    engine = engine_for("llava")
    got = engine.generate("what colour is the circle ?", images=[SCENE], plan="lastq:layer=2,keep=0.25",
                          max_new_tokens=2)
    want = engine.generate("what colour is the circle ?", images=[SCENE], plan="fastv:layer=2,keep=0.25",
                           max_new_tokens=2)
    n = want.stats["visual_tokens"]
    assert seen and seen[0][-1] == n  # [H, N_visual]: the row it declared, recorded for it
    assert torch.equal(got.kept[0], want.kept[0]) and got.token_ids == want.token_ids


def test_an_unknown_signal_is_refused_before_any_work(monkeypatch, engine_for):
    cls, seen = make_pruner("typo", Signals("llm.last_qery"))
    monkeypatch.setitem(REGISTRY, "typo", cls)
    with pytest.raises(TypeError, match=r"unknown signal\(s\) \['llm.last_qery'\]; known: llm.last_query"):
        engine_for("llava").generate("what colour is the circle ?", images=[SCENE], plan="typo:layer=2,keep=0.25")
    assert seen == []


def test_an_old_class_flag_is_refused_at_once():
    with pytest.raises(TypeError, match="declare what it reads as signals = Signals"):
        type("OldStyle", (Pruner,), {"name": "old", "needs": "last_query"})
