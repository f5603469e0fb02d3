"""`dart`: DART (Wen et al., EMNLP 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More"): a few pivot tokens, then the visual tokens least duplicated by them.

What the official code does (ZichenWen1/DART, LLaVA path: ``llava/model/language_model/modeling_llama_self.py``,
``DART_K_norm.forward`` and ``get_retained_image_token``; configured by ``llava/eval/model_vqa_loader.py``,
``configure_DART``: K = ``--pruned_layer`` 2, ``image_token_start_index`` 35, ``image_token_length`` 576,
``pivot_image_token`` 4, ``pivot_text_token`` 4, ``max_num_trunction`` M = 128 by default; read in the fork
xqy1111111/DART at commit 0247657060a4, the upstream's code not being stored here), once, in the prefill,
before decoder layer K:
  * signals of layer K-1: its output hidden states through the model's final norm (``self.norm``), and its
    keys as the attention computed them (``layer_outputs[-2]``: RoPE applied, KV heads repeated, flattened
    per token to [S, H*d]);
  * pivots: the ``pivot_image_token`` image tokens with the largest L1 norm of their keys, and the
    ``pivot_text_token`` text tokens after the image (question and template) with the largest key L1 norm;
  * TOKEN_TOPK t = M // (pivots), with pivots = pivot_image_token + pivot_text_token; the candidates are
    the image tokens that are not image pivots; visiting the pivots in the order of ``list(set(positions).copy())``
    (their sequence positions, image pivots' first in the list that made the set), each pivot takes the t
    candidates least similar to it (top-t of minus the cosine similarity of the normed hidden states) and
    removes them from the candidates;
  * kept: the image pivots and every token taken (text pivots are not image tokens: text always stays);
    the sequence is gathered, position ids = the kept original positions.
  So the official run keeps pivot_image_token + pivots * t image tokens: M = 192 / 128 / 64 keeps 196 / 132 / 68.

What we do: the same on the stage's tokens, with the signals ``llm.keys`` (layer K-1's keys, as the
attention function gets them, heads repeated and flattened as the official code does), ``llm.normed`` (the
hidden states entering layer K through the LLM's own final norm module) and ``llm.positions``. ``keep`` is
the count kept: ``keep = pivot_image + pivots * t`` is exactly the official run with M = pivots * t (keep
196 / 132 / 68 <-> M 192 / 128 / 64); the stage's default layer is the official K = 2 (layer K-1 read).
Choices and differences:
(1) pivot order: the official CPython set order of their positions (``list(set(image + text).copy())``:
    the kept set depends on it; position order differs slightly, and so does the uncopied set's order
    from 16 pivots on). Positions are each token's index in its request's prompt as the processor made it
    (``llm.positions``: the official indices for one prompt);
(2) candidates in ascending position, what ``list(set(...))`` of the official candidates iterates while
    the positions stay below the set's table size (LLaVA-1.5's 35..610): only exact ties could differ;
(3) a keep the official code cannot reach (keep - pivot_image not a multiple of pivots): t = that // pivots
    and the first (keep - pivot_image) % pivots pivots visited take t + 1; keep < pivot_image: the keep
    image pivots; fewer text tokens than ``pivot_text``: all of them (the official topk raises);
(4) every family's LLM (the official code: LLaVA-1.5 / NeXT here, Qwen2-VL in its own tree): the visual
    tokens are the request's wherever they are (several images, video), the text tokens those after the
    last visual token (the official: after image_token_start_index + image_token_length, the same for one
    image); tokens before the first visual token are neither pivots nor candidates, as in the official code;
(5) one request at a time in a batch (the official code: batch size 1); similarities in the model dtype,
    as the official code. ``scores``: the key L1 norm of each visual token (the image-pivot ranking).
The official code prunes only inside the LLM, where its signals exist: ``where=llm`` only.
"""
import torch
import torch.nn.functional as F

from .base import Pruner, Selection, Signals, StageInput
from .options import Option


def key_l1(keys: torch.Tensor) -> torch.Tensor:
    """[M, H*d] keys -> [M] their L1 norm (the pivot ranking)."""
    return torch.norm(keys, p=1, dim=-1)


def visit_order(image_pos: list[int], text_pos: list[int]) -> list[int]:
    """The pivots' positions in the order the official code visits them: CPython's iteration order of a copy
    of the set made from the image pivots (top-k order) then the text pivots (``tmp_set = indices_set.copy()``:
    a copy may order them differently from the set it copies)."""
    return list(set(image_pos + text_pos).copy())


def take_counts(keep: int, n_image: int, n_pivots: int) -> list[int]:
    """How many candidates each visited pivot takes so that n_image + sum == keep: t = (keep - n_image) //
    n_pivots each (the official TOKEN_TOPK), the first (keep - n_image) % n_pivots one more."""
    t, extra = divmod(keep - n_image, n_pivots)
    return [t + (j < extra) for j in range(n_pivots)]


def least_duplicated(pivot: torch.Tensor, normed: torch.Tensor, free: torch.Tensor, count: int) -> torch.Tensor:
    """pivot [D], normed [N, D], free [N] bool -> indices into N of the ``count`` free tokens least cosine-similar
    to the pivot (candidates in ascending index)."""
    cand = free.nonzero().flatten()
    sim = -F.cosine_similarity(pivot, normed[cand], dim=-1)
    return cand[sim.topk(count).indices]


class DARTPruner(Pruner):
    name = "dart"
    wheres = ("llm",)
    default_where = "llm"
    default_layer = 2  # the official pruned_layer K: layer 1's output and keys, pruned before layer 2
    signals = Signals("llm.keys", "llm.normed", "llm.positions")
    scored = True  # its scores rank every entering token (keep=auto,mass=)
    options = {
        "pivot_image": Option("int", "image pivots: the visual tokens with the largest key L1 norm", 4, low=1),
        "pivot_text": Option("int", "text pivots: the text tokens after the image with the largest key L1 norm",
                             4, low=0),
    }

    def select(self, inp: StageInput) -> Selection:
        if inp.llm_keys is None or inp.normed is None or inp.positions is None:
            raise ValueError("dart reads llm.keys, llm.normed and llm.positions (an LLM stage's signals)")
        n_img = min(self.option(inp.options, "pivot_image"), inp.keep)
        n_txt = min(self.option(inp.options, "pivot_text"), inp.text_keys.shape[0]) if n_img < inp.keep else 0
        scores = key_l1(inp.llm_keys)
        img = scores.topk(n_img).indices
        txt = key_l1(inp.text_keys).topk(n_txt).indices
        vectors = {int(inp.positions[i]): inp.normed[i] for i in img.tolist()}
        vectors.update({int(inp.text_positions[t]): inp.text_normed[t] for t in txt.tolist()})
        free = torch.ones(inp.tokens.shape[0], dtype=torch.bool, device=scores.device)
        free[img] = False
        order = visit_order(inp.positions[img].tolist(), inp.text_positions[txt].tolist())
        for pos, count in zip(order, take_counts(inp.keep, n_img, len(order))):
            if count:
                free[least_duplicated(vectors[pos], inp.normed, free, count)] = False
        return Selection(keep_idx=(~free).nonzero().flatten(), scores=scores.float())
