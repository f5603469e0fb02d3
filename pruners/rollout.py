"""`rollout`: attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers").

Importance of a patch = the [CLS] row of the rolled-out attention through every tower layer
up to the stage: r <- r (0.5 A_l + 0.5 I) from the last layer down to the first, starting at
r = e_CLS, with A_l the head-mean attention of layer l. ``r A_l`` is the attention the keys
receive from queries weighted by r, computed from the layer's queries and keys in chunks
(kernels.reference.importance_ref): memory O(chunk x tokens), never the full matrix.
Needs a tower with a CLS token.
"""
from ..kernels.reference import importance_ref
from .base import Pruner, Selection, Signals, StageInput, TowerRecord, cls_or_surrogate, topk_sorted


def cls_rollout(qk_by_layer: list, prefix: int = 1):
    """[(q, k) per layer, first to last], each [n, H, S, d] -> [n, S - prefix] rollout CLS row."""
    q0 = qk_by_layer[-1][0]
    r = q0.new_zeros(q0.shape[0], q0.shape[2], dtype=q0.new_zeros(()).float().dtype)
    r[:, 0] = 1.0
    for q, k in reversed(qk_by_layer):
        flow = importance_ref(q, k, scale=q.shape[-1] ** -0.5, query_weights=r).mean(1)  # r @ A, head mean
        r = 0.5 * flow + 0.5 * r
    return r[:, prefix:]


class RolloutPruner(Pruner):
    name = "rollout"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    wheres = ("vision", "pre_llm")
    signals = Signals(required=("tower.qk",))

    def tower_layers(self, last: int, options: dict) -> list[int]:
        return list(range(last + 1))

    def tower_score(self, rec: TowerRecord, layers: list[int]):
        return cls_rollout([rec.qk[layer] for layer in layers], rec.prefix)

    def select(self, inp: StageInput) -> Selection:
        scores = cls_or_surrogate(inp)
        return Selection(keep_idx=topk_sorted(scores, inp.keep), scores=scores)
