"""`priority`: keep the tokens the caller ranks highest.

The request carries one number per visual token (``Request.priority``, in the request's original
visual-token order); the top ``keep`` survive, ties broken by position. It is a yardstick, not a method:
an upper bound from outside knowledge (``eval/shapeworld/oracle.py`` ranks by the shape world's ground truth:
the tokens of the objects the question is about, then the other objects, then background), or an
ablation with scores from elsewhere. Refused for a request that carries no priorities.
"""
import torch

from .base import Pruner, Selection, Signals, StageInput


class PriorityPruner(Pruner):
    name = "priority"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    wheres = ("pre_llm",)
    signals = Signals("request.priority")

    def select(self, inp: StageInput) -> Selection:
        p = inp.priority.float()
        order = torch.sort(-p, stable=True).indices  # highest first; equal priorities in token order
        return Selection(keep_idx=order[: inp.keep].sort().values, scores=p)
