"""`cls`: VTC-CLS (Wang et al., 2024, "[CLS] Token Tells Everything Needed for Training-free
Efficient MLLMs").

Importance of a patch = the attention the [CLS] query pays it (head mean) in the layer that
yields the LLM's features; with ``layers=a/b/c`` the CLS attentions of several tower layers
are summed (the paper's ensemble). Top-k, kept in original order.

Towers without a CLS token (SigLIP, Qwen-VL): the surrogate of ``cls_or_surrogate``, the
attention of a mean-pooled query over the stage's tokens.
"""
from ..engine.errors import PlanError
from .base import Pruner, Selection, Signals, StageInput, TowerRecord, cls_or_surrogate, topk_sorted
from .options import Option


class ClsPruner(Pruner):
    name = "cls"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    wheres = ("vision", "pre_llm")
    options = {"layers": Option("ints", "tower layers whose CLS attention is summed (VTC-CLS's ensemble; "
                                        "default: the feature layer)", None, low=0)}
    signals = Signals("tower.cls")

    def tower_layers(self, last: int, options: dict) -> list[int]:
        layers = sorted(set(self.option(options, "layers") or [last]))
        if layers[0] < 0 or layers[-1] > last:
            raise PlanError(f"cls: ensemble layers must be in [0, {last}] (the stage reads tower layers up to {last})")
        return layers

    def tower_score(self, rec: TowerRecord, layers: list[int]):
        return sum(rec.cls[layer][:, :, rec.prefix:].float().mean(1) for layer in layers)

    def select(self, inp: StageInput) -> Selection:
        scores = cls_or_surrogate(inp)
        return Selection(keep_idx=topk_sorted(scores, inp.keep), scores=scores)
