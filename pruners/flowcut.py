"""`flowcut`: FlowCut (Tong et al., 2025, "FlowCut: Rethinking Redundancy via Information Flow").

Information flow through the tower, read at every 2nd layer up to the stage (the CLS token is
the relay). At each such layer l, over the patches still alive:
    score_l = (a_l / sum a_l + s_l / sum s_l) * |v|_1
with a_l the CLS attention (head mean), s_l the CLS-value cosine similarity (head mean,
clipped at 0) and |v|_1 the L1 norm of each patch's value (all heads). Scores accumulate with
an EMA (``ema``, default 0.5). Each step removes
    r = round((N_alive - keep) / sqrt(steps_left) * (1 - (H(a_l) / log N_alive)^2))
of the lowest accumulated scores (entropy-adaptive: a peaked CLS attention prunes more), and
the last step lands exactly on ``keep``.

Choice: the tower still runs in full (the steps are replayed on the recorded signals at the
stage), so the selection is FlowCut's but the saving is in the LLM, not inside the tower.
Needs a tower with a CLS token.
"""
import math

import torch

from .base import Pruner, Selection, StageInput, TowerRecord
from .options import Option


class FlowCutPruner(Pruner):
    name = "flowcut"
    wheres = ("pre_llm",)
    options = {"ema": Option("float", "weight of the running score in the EMA across layers", 0.5, low=0, high=1)}
    vision_needs = frozenset({"cls", "values"})
    requires_tower = True

    def tower_layers(self, last: int, options: dict) -> list[int]:
        return list(range(last % 2, last + 1, 2))

    def tower_score(self, rec: TowerRecord, layers: list[int]) -> torch.Tensor:
        """[n, P, 3 * L]: per layer (CLS attention, CLS value similarity, value L1 norm) of every patch."""
        p = rec.prefix
        chans = []
        for layer in layers:
            chans += [rec.cls[layer][:, :, p:].float().mean(1), rec.value_sim[layer][:, :, p:].float().mean(1).clamp_min(0),
                      rec.values_l1[layer][:, :, p:].float().sum(1)]
        return torch.stack(chans, dim=-1)

    def select(self, inp: StageInput) -> Selection:
        sig = inp.tower_score.float().view(inp.tokens.shape[0], -1, 3)  # [N, L, 3]
        ema = self.option(inp.options, "ema")
        n, steps = sig.shape[0], sig.shape[1]
        alive = torch.arange(n, device=sig.device)
        acc = torch.zeros(n, device=sig.device)
        eps = 1e-12
        for t in range(steps):
            a, s, v = sig[alive, t, 0] + eps, sig[alive, t, 1] + eps, sig[alive, t, 2]
            score = (a / a.sum() + s / s.sum()) * v
            acc[alive] = score if t == 0 else ema * acc[alive] + (1 - ema) * score
            excess = alive.numel() - inp.keep
            if t == steps - 1:
                r = excess
            else:
                prob = a / a.sum()
                h = -(prob * prob.log()).sum() / math.log(max(alive.numel(), 2))
                r = min(excess, int(round(excess / math.sqrt(steps - t) * (1 - float(h) ** 2))))
            if r > 0:
                drop = torch.topk(acc[alive], r, largest=False).indices
                keep_mask = torch.ones(alive.numel(), dtype=torch.bool, device=sig.device)
                keep_mask[drop] = False
                alive = alive[keep_mask]
        return Selection(keep_idx=alive.sort().values, scores=acc)
