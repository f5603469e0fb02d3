"""`mmtok`: MMTok (Dong et al., ICLR 2026, "MMTok: Multimodal Coverage Maximization for Efficient Inference
of VLMs").

What the official code does (Ironieser/MMTok; LLaVA-1.5 / NeXT path: ``mmtok/llava/clip_encoder_mmtok.py``,
``CLIPVisionTower_MMTok.forward`` -> ``mmtok/core/mmtok_core.py``, ``MMTokCore.apply_selection`` /
``select_vision_tokens`` -> ``mmtok/core/semantic_selector.py``, ``SemanticTokenSelector.mm_coverage_selection``
and ``greedy_merged_jit_kernel``), for ``target_vision_tokens = T`` (``mmtok/llava/llava_inject.py``,
``mmtok``: alpha 0.5, ``softmax_tv_temperature`` 0.02, ``softmax_vv_temperature`` 0.2):
  * signals: X [N, D] the projected patches (``mm_projector(hidden_states[-2][:, 1:])``), X_v [N, C] the feature
    layer's patches (``hidden_states[-2]``, CLS stripped), Z [M, D] the question's keywords embedded by the LLM's
    own input embedding table (``_encode_text_with_token_pooling``: ``VQATextProcessor.extract_keywords_simple``
    drops the two LLaVA answer-format prompts and a fixed stop-word list, the words are tokenised with
    ``is_split_into_words=True``, a leading BOS dropped; the CLIP text tower it loads is never used);
  * every row L2-normalised (``x / max(|x|, 1e-8)``, float32); P = softmax(Z X^T / t_tv, over the patches) / M
    (text covered by patches), Q = softmax(X_v X_v^T / t_vv, over the patches) / N (patches covered by patches);
    C = [P; alpha Q] [(M + N), N];
  * greedy maximum coverage: with best [M + N] = 0, T times pick the patch j maximising
    sum_rows max(C[:, j] - best, 0) (``torch.argmax``: the first of exact ties), excluded and picked patches
    at -inf, then best = max(best, C[:, j]);
  * excluded: on LLaVA-1.5 (``remove_padding_indices``, ``mmtok/llava/patch_llava.py``,
    ``calculate_padding_patch_indices``) the rows / columns of patches wholly inside the padding that
    ``expand2square`` adds to a non-square image;
  * kept: the T picked patches, ascending; their projected features go to the LLM (nothing merged).
  ``T`` is the count the official code keeps: ``keep = T`` (LLaVA-1.5's 192 / 128 / 64).

What we do: the same selection, on the stage's tokens (X: the projected features), with the signals
``tower.patches`` (X_v: the feature layer's hidden states beside the projected tokens, LLaVA-1.5's projector
input) and ``request.keywords`` (Z: ``MMTokPruner.keywords`` of the request's question, placeholders removed,
through the model's tokenizer and input embeddings). Differences: (1) padding: transformers' LLaVA-1.5
processor (``CLIPImageProcessor``) resizes the short side and centre-crops; it adds no padding, so there are
no padding patches to exclude (the official exclusion list is empty for square images, and here every patch
is image content: the crop loses the long side's edges, which the official padding keeps); the official rule
is ``padding_patches`` below, for the test; (2) families that give no projector input (all but LLaVA-1.5, and
video requests): Q on the stage's (projected) tokens; the official Qwen2.5-VL wrapper
(``mmtok/qwen/modeling_qwen2_5_vl_mmtok.py``) takes the last vision block's states averaged over each 2 x 2
merge unit, with the text ``"Question: " + question`` unfiltered (``text=question`` here) and t_tv = 0.01
(``tv_temperature=0.01``) and keeps ``int(ratio x N)``; (3) one greedy pass over the stage's tokens (the
official code keeps T per image of a batch, on LLaVA-NeXT per anyres tile and the base image, and drops the
newline tokens; LLaVA-1.5 has one image a request); (4) a question that is
empty once placeholders are removed uses the official default "What do you see in this image?"; (5) with no
keyword embeddings (a frames stage's ``within=mmtok``, which hands a frame's pruner no question signal) only
the image's own tokens are covered (C = alpha Q).
Scores: each token's coverage gain before the first pick (its coverage alone).
"""
import re
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Pruner, Selection, Signals, StageInput
from .options import Option

# official ``mmtok/core/text_processor.py``: stop words of little visual relevance, and LLaVA's answer formats
NON_VISUAL_WORDS = frozenset({
    "a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "have", "has", "had", "do", "does", "did",
    "it", "they", "he", "she", "we", "you", "i", "what", "where", "when", "why", "how", "who", "which",
    "and", "or", "but", "so", "if", "then", "question", "answer",
    "to", "for", "with", "by", "from", "at", "into", "onto", "upon"})
ANSWER_PROMPTS = ("Answer the question using a single word or phrase.",
                  "Answer with the option's letter from the given choices directly.")
WORD = re.compile(r"\b\w+\b")
DEFAULT_QUESTION = "What do you see in this image?"  # the official code's question when it finds none
NORM_EPS = 1e-8  # the official ``_l2_normalize`` clamp


def keyword_text(question: str) -> str:
    """The official ``extract_keywords_simple``: answer prompts removed, stop words dropped (all of them
    stop words: the text as given)."""
    if not question:
        return ""
    for prompt in ANSWER_PROMPTS:
        question = question.replace(prompt, "")
    words = WORD.findall(question)
    kept = [w for w in words if w.lower() not in NON_VISUAL_WORDS]
    return " ".join(kept) if kept else question


def unit(x: torch.Tensor) -> torch.Tensor:
    """[R, C] rows divided by their norm (at least 1e-8), float32."""
    return (x / x.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS)).float()


def coverage(text: torch.Tensor, tokens: torch.Tensor, patches: torch.Tensor, alpha: float, tv_temperature: float,
             vv_temperature: float) -> torch.Tensor:
    """text [M, D], tokens [N, D] (projected), patches [N, C] -> C = [P; alpha Q] [M + N, N] (see module doc);
    M = 0: C = alpha Q."""
    z, x, xv = unit(text), unit(tokens), unit(patches)
    p = z @ x.T  # [M, N] text covered by each token
    q = xv @ xv.T  # [N, N] tokens covered by each token
    m, n = p.shape
    p = F.softmax(p * (1.0 / tv_temperature), dim=1) / max(m, 1)
    q = F.softmax(q * (1.0 / vv_temperature), dim=1) / n
    return torch.cat([p, q * alpha], dim=0)


def greedy_cover(cover: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cover [R, N], k picks -> (picked [k] in pick order, first gains [N]); excluded columns are never picked
    while others remain (the official -inf mask)."""
    rows, n = cover.shape
    best = torch.zeros(rows, dtype=cover.dtype, device=cover.device)
    mask = torch.zeros(n, dtype=cover.dtype, device=cover.device)
    if exclude is not None and exclude.numel():
        mask[exclude] = float("-inf")
    picked = torch.empty(k, dtype=torch.long, device=cover.device)
    first = None
    for i in range(k):
        gain = (cover - best[:, None]).clamp_min(0).sum(0)  # [N]
        first = gain.clone() if first is None else first
        j = torch.argmax(gain + mask)
        picked[i] = j
        best = torch.maximum(best, cover[:, j])
        mask[j] = float("-inf")
    return picked, first


def mmtok_select(text, tokens, patches, keep, alpha=0.5, tv_temperature=0.02, vv_temperature=0.2, exclude=None):
    """text [M, D], tokens [N, D], patches [N, C] -> (kept [keep] ascending, first gains [N])."""
    cover = coverage(text, tokens, patches, alpha, tv_temperature, vv_temperature)
    picked, first = greedy_cover(cover, keep, exclude)
    return picked.sort().values, first


def padding_patches(width: int, height: int, side_px: int = 336, patch: int = 14) -> list[int]:
    """The official ``calculate_padding_patch_indices`` (``include_overlap=False``): patches wholly inside the
    padding ``expand2square`` adds to a width x height image resized to side_px (LLaVA-1.5). Not used by the
    engine (transformers' processor crops, adds no padding): the rule, for the record and the test."""
    if width == height:
        return []
    grid = side_px // patch
    scaled = int(round((height if width > height else width) * side_px / max(width, height)))
    if scaled == side_px:
        return []
    before = (side_px - scaled) // 2
    lines = list(range(before // patch)) + list(range(grid - (side_px - scaled - before) // patch, grid))
    if width > height:  # rows of padding, top then bottom
        return [r * grid + c for r in lines for c in range(grid)]
    return [r * grid + c for c in lines for r in range(grid)]  # columns, left then right


class MMTokPruner(Pruner):
    name = "mmtok"
    official_positions = "contiguous"  # what its official code does: docs/pruners.md, "Positions"
    wheres = ("pre_llm",)
    options: ClassVar[dict] = {
        "alpha": Option("float", "weight of covering the image's own tokens beside the text (official alpha)", 0.5,
                        low=0),
        "tv_temperature": Option("float", "softmax temperature of text-token coverage (official 0.02 on LLaVA, "
                                          "0.01 in its Qwen2.5-VL wrapper)", 0.02, low=1e-4),
        "vv_temperature": Option("float", "softmax temperature of token-token coverage (official 0.2)", 0.2, low=1e-4),
        "text": Option("str", "text to cover: keywords of the question (official LLaVA path) or 'Question: ' + the "
                              "question (official Qwen2.5-VL path)", "keywords", choices=("keywords", "question"))}
    signals = Signals("tower.patches", "request.keywords")  # the engine gives keywords on every family
    scored = True  # its scores rank every entering token (keep=auto,mass=)

    def keywords(self, question: str, options: dict) -> str:
        """The text whose token embeddings are covered (signal ``request.keywords``): see the module doc."""
        question = question.strip() or DEFAULT_QUESTION
        if self.option(options, "text") == "question":
            return f"Question: {question}"
        return keyword_text(question)

    def select(self, inp: StageInput) -> Selection:
        patches = inp.patches if inp.patches is not None else inp.tokens  # documented surrogate
        text = inp.text_embeds if inp.text_embeds is not None else inp.tokens[:0]  # none: image coverage only
        o = inp.options
        kept, first = mmtok_select(text, inp.tokens, patches, inp.keep, self.option(o, "alpha"),
                                   self.option(o, "tv_temperature"), self.option(o, "vv_temperature"))
        return Selection(keep_idx=kept, scores=first)
