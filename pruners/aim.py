"""`aim`: AIM (Zhong et al., 2024, "AIM: Adaptive Inference of Multi-Modal LLMs via Token
Merging and Pruning").

Before the LLM: ToMe-style bipartite merging within each frame / image (the budget split over
items by their size), by cosine similarity of the features. Inside the LLM: each visual
token's importance is the attention the text tokens pay it (mean over text rows and heads);
the top-k survive. AIM's progressive schedule (a little more at every layer from a middle
layer on) is a sequence of plan entries, e.g. ``aim:keep=0.25;aim:where=llm,layer=8,keep=0.8;
aim:where=llm,layer=12,keep=0.6``.
"""
import torch

from .base import Pruner, Selection, StageInput, topk_sorted
from .grid import items, split_budget
from .tome import bipartite_merge


class AIMPruner(Pruner):
    name = "aim"
    wheres = ("pre_llm", "llm")
    default_where = "pre_llm"
    default_layer = 8
    needs = "text_rows"

    def select(self, inp: StageInput) -> Selection:
        if inp.text_attn is not None:  # inside the LLM
            scores = inp.text_attn.float().mean(dim=(0, 1))
            return Selection(keep_idx=topk_sorted(scores, inp.keep), scores=scores)
        sizes = inp.sizes if inp.sizes is not None else torch.ones(inp.tokens.shape[0])
        keep_idx, tokens, groups = [], [], torch.full((inp.tokens.shape[0],), -1, dtype=torch.long)
        groups_of = items(inp.coords)
        for g, k in zip(groups_of, split_budget([len(x) for x in groups_of], inp.keep)):
            if k == 0:
                continue
            g = g.to(inp.tokens.device)
            idx, merged, owner = bipartite_merge(inp.tokens[g], inp.tokens[g], sizes.to(inp.tokens.device)[g], k)
            groups[g.cpu()] = (owner + sum(len(x) for x in keep_idx)).cpu()
            keep_idx.append(g[idx])
            tokens.append(merged)
        keep_idx = torch.cat(keep_idx)
        order = keep_idx.argsort()
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        groups = torch.where(groups >= 0, rank.cpu()[groups.clamp_min(0)], -1)
        return Selection(keep_idx=keep_idx[order], tokens=torch.cat(tokens)[order].to(inp.tokens.dtype),
                         groups=groups.to(inp.tokens.device))
