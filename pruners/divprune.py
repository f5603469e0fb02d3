"""`divprune`: DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning").

Max-min diversity on the cosine distance d = 1 - cos(x_i, x_j) of the tokens entering the
stage (the projected features before the LLM): the first token is the one farthest from its
nearest neighbour; each next token maximises its distance to the closest token already
chosen. No attention is used.
"""
import torch
import torch.nn.functional as F

from .base import Pruner, Selection, StageInput


def max_min_diverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [N, D] -> [k] chosen positions in the order chosen (greedy max-min on cosine distance)."""
    xn = F.normalize(x.float(), dim=-1)
    dist = 1.0 - xn @ xn.T  # [N, N]
    n = x.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=x.device)
    nn_dist = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("inf")).min(dim=1).values
    chosen = [int(nn_dist.argmax())]
    closest = dist[chosen[0]].clone()
    closest[chosen[0]] = float("-inf")
    for _ in range(k - 1):
        nxt = int(closest.argmax())
        chosen.append(nxt)
        closest = torch.minimum(closest, dist[nxt])
        closest[chosen] = float("-inf")
    return torch.tensor(chosen, device=x.device)


class DivPrunePruner(Pruner):
    name = "divprune"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"

    def select(self, inp: StageInput) -> Selection:
        return Selection(keep_idx=max_min_diverse(inp.tokens, inp.keep).sort().values)
