"""`fastv`: FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2").

Inside the LLM, before decoder layer K: the head-averaged attention that the last prompt
token pays to each visual token in layer K-1 is its importance; the top-k survive, and
their original position ids are kept. ``scoring=eager`` scores the same tokens the way the peers do
(the whole attention matrix of layer K-1 materialised): the benchmark's baseline, same kept set.
"""
from .base import Pruner, Selection, Signals, StageInput, topk_sorted
from .options import Option


class FastVPruner(Pruner):
    name = "fastv"
    scored = True  # Selection.scores rank the entering tokens (keep=auto,mass=: engine/budget.py)
    wheres = ("llm",)
    default_where = "llm"
    default_layer = 2
    signals = Signals("llm.last_query")
    options = {"scoring": Option("str", "fused: the importance beside the attention output (no attention matrix); "
                                        "eager: FastV's repository's way, layer K-1's full attention matrix "
                                        "materialised (output_attentions), for comparison", "fused",
                                 choices=("fused", "eager"))}

    def select(self, inp: StageInput) -> Selection:
        scores = inp.attn.float().mean(dim=0)  # [H, N] -> [N]
        return Selection(keep_idx=topk_sorted(scores, inp.keep), scores=scores)
