"""The signals pruners read: the one table of their names, and the code that records and hands them out.

A pruner declares what it reads (``Pruner.signals = Signals("llm.last_query")``, ``pruners/base.py``); the
engine records a signal only where a stage of the plan asked for it, and hands it to the pruner as the
``StageInput`` field(s) named below. Names by source:

=======================  ===========================================================  ==========================
name                     recorded (where, when)                                       StageInput field(s)
=======================  ===========================================================  ==========================
llm.last_query           LLM layer K-1 of a stage at layer K (prefill): the last      attn [H, N]
                         prompt token's softmax row, every head (fused kernel on GPU;
                         stage option ``scoring=eager``: the eager reference)
llm.last_query_norope    the same row with RoPE removed from the query and keys       attn [H, N]
llm.text_rows            layer K-1: the row of every text token after the last        text_attn [H, T, N]
                         visual token
llm.all_rows             layer K-1: every valid token's row over every token          seq_attn [H, S, S],
                         (O(S^2): AIM's PageRank, as its official eager attention)    seq_vis [N]
llm.text_rows_full       layer K-1: the text rows after the last visual token with    text_attn [H, T, N]
                         RoPE removed and no causal mask: softmax over every valid
                         key (PruneVid's ``attn_weights_wo_pos``)
llm.text_raters          before decoder layer 0: the pruner's ``text_raters`` on the  raters [T]
                         LLM's input embeddings (SparseVLM), per LLM stage
llm.keys                 layer K-1 (prefill): every token's keys as the attention     llm_keys [N, H*d],
                         gets them (RoPE applied; KV heads repeated to the query      text_keys [T, H*d]
                         heads, as ``repeat_kv``), heads flattened per token (DART)
llm.normed               before layer K: the hidden states entering it (layer K-1's   normed [N, D],
                         output) through the LLM's own final norm (DART)              text_normed [T, D]
llm.positions            each token's index in its request's prompt as the processor  positions [N],
                         made it (before any pruning) (DART's pivot order)            text_positions [T]
tower.cls                vision layers ``Pruner.tower_layers`` (a CLS tower only):    tower_score [N] (the
                         the CLS query's softmax row                                  pruner's ``tower_score``)
tower.keys               the same layers: head-mean keys                              keys [N, d]
tower.values             the same layers: value L1 norms and CLS-value similarity    tower_score [N]
tower.qk                 the same layers: the layer's q and k (attention flow)        tower_score [N]
tower.received           the same layers (any hooked tower, CLS or not): the softmax      tower_score [N] (the
                         attention each token receives, mean over heads and query rows  pruner's ``tower_score``)
                         (HoliTom; SigLIP ``attentions[-1].mean(1).mean(1)``)
tower.features           the tower's feature-layer hidden states, the projector's     tokens [N, D_tower] (a
                         input (LLaVA-1.5: ``encode_images_and_tower``); a pre_llm    pre_llm merge: the merged
                         stage merges them and the engine projects the result         tokens are projected)
frames.relevance         a frames stage's pass: ``quota.RelevanceScorer`` (a VLM      frame_relevance [T]
                         rates each sampled frame; ``engine/frames.py``)
frames.clip              a frames stage's pass: ``keyscore.ClipScorer`` (open_clip    frame_embeds [T, E],
                         embeddings of the frames and the question)                   text_embed [E]
video.spans              the merge bookkeeping (``owner``) and each original token's   spans [N, 2]
                         frame: the first and last frame of the original tokens each
                         token stands for (PruneVid: > 1 frame = a static token)
request.priority         the request's own numbers (``Request.priority``), checked    priority [N]
                         before any work: a request without them is refused
llm.instruction          a pre_llm stage's pass: the request's question (no chat      instruction [M, D]
                         template) through the tokenizer and the LLM's input
                         embeddings (``instruction_embeds``), metered apart
tower.patches            the feature layer's hidden states (the projector's input)    patches [N, D_tower]
                         beside the projected tokens (``encode_images_and_tower``;
                         LLaVA-1.5's images; elsewhere absent: the pruner's surrogate)
request.keywords         a pre_llm stage: the pruner's ``keywords(question, options)``  text_embeds [M, D]
                         (placeholders removed), tokenised word by word by the
                         model's tokenizer (leading BOS dropped), through its input
                         embeddings (``keyword_embeds``; MMTok)
=======================  ===========================================================  ==========================

``T`` text tokens of the ``llm.*`` fields: a request's tokens after its last visual token (``text_rows``).

``required`` names (``Signals(..., required=...)``) make the stage refused where the model cannot give
them (tower signals on a family without a CLS tower); the others fall back to the pruner's documented
surrogate (``cls_or_surrogate``, ``keys_or_tokens``).

Adding a signal: its row in ``SIGNALS`` (below) and its recording here, at its source, plus the pruner's
``Signals(...)`` and the ``StageInput`` field it fills. Issue 45's methods, for instance, would add
``llm.first_keys`` (the first LLM layer's keys: recorded by ``record_rows``' caller, the attention function,
at layer 0 as the ``llm.*`` rows are at layer K-1 -> a ``keys``-like field), ``llm.text_hidden`` (the text
tokens' hidden states at the stage's layer: read in ``before_llm_layer`` as ``pick_raters`` reads layer 0's
input -> ``text_hidden [T, D]``) and ``image.clip`` / ``image.clip_text`` (CLIP embeddings of a request's
images and its question: a scorer like ``frames.clip`` in ``engine/frames.py``'s ``SCORERS``, run for a
pre_llm stage -> ``image_embeds``, ``text_embed``).

Vision tower (CLIP with a CLS token): the CLS row (single-row kernel / reference), head-mean keys, value L1
norms, CLS value similarity, or a layer's q/k, only at the layers a stage asked for. Every signal is
O(rows x tokens) in memory; only "llm.all_rows" materialises a request's attention matrix, in the layer read.
"""
from __future__ import annotations

import torch

from ..kernels import attention_row
from ..kernels.reference import full_mask

SIGNALS = {  # every name a pruner may declare -> what it is (the table above)
    "llm.last_query": "the last prompt token's attention row in layer K-1",
    "llm.last_query_norope": "the same row with RoPE removed",
    "llm.text_rows": "each text token's attention row in layer K-1",
    "llm.all_rows": "every token's attention row in layer K-1",
    "llm.text_rows_full": "the text rows after the video in layer K-1, RoPE removed, no causal mask",
    "video.spans": "first and last frame of the original tokens each token stands for",
    "llm.text_raters": "the text rows that rate the image, picked from the LLM's input embeddings",
    "llm.keys": "every token's keys in layer K-1 (RoPE applied, heads repeated to the query heads)",
    "llm.normed": "the hidden states entering layer K through the LLM's final norm",
    "llm.positions": "each token's index in its request's prompt",
    "tower.cls": "the CLS attention row of the tower layers read",
    "tower.keys": "head-mean keys of the tower layers read",
    "tower.values": "value L1 norms and CLS-value similarity of the tower layers read",
    "tower.qk": "q and k of the tower layers read",
    "tower.received": "attention each tower token receives, mean over heads and query rows, of the layers read",
    "tower.features": "the projector's input (feature-layer hidden states), merged before projection",
    "frames.relevance": "a VLM's rating of each frame (quota.RelevanceScorer)",
    "frames.clip": "CLIP embeddings of each frame and the question (keyscore.ClipScorer)",
    "request.priority": "the request's own priority of each visual token",
    "llm.instruction": "the question's LLM input embeddings, one row per token (CDPruner's relevance)",
    "tower.patches": "the feature layer's hidden states beside the projected tokens (not merged)",
    "request.keywords": "the LLM input embeddings of the question's keywords (the pruner's ``keywords``)",
}
LLM_ROWS = {"llm.last_query": "last_query", "llm.last_query_norope": "last_query_norope",
            "llm.text_rows": "text_rows", "llm.all_rows": "all_rows",
            "llm.text_rows_full": "text_rows_full"}  # attention rows read in layer K-1
TOWER_RECORDS = {"tower.cls": "cls", "tower.keys": "keys", "tower.values": "values", "tower.qk": "qk",
                 "tower.received": "received"}
CLS_FREE = frozenset({"received"})  # tower records that need no CLS token (recorded on any hooked tower)


def declared(pruner):
    """The pruner's ``Signals``, every name checked against SIGNALS (a typo fails here, naming the known ones)."""
    unknown = sorted(pruner.signals.reads - set(SIGNALS))
    if unknown:
        raise TypeError(f"pruner '{pruner.name}' declares unknown signal(s) {unknown}; known: {', '.join(SIGNALS)} "
                        "(engine/signals.py)")
    return pruner.signals


def reads(pruner, name: str) -> bool:
    """The pruner reads the signal ``name`` (a name of SIGNALS)."""
    return name in declared(pruner)


def llm_rows(pruner) -> str | None:
    """The attention rows recorded for the pruner in layer K-1 ("last_query", "text_rows", ...), or None."""
    return next((LLM_ROWS[n] for n in sorted(declared(pruner).of("llm")) if n in LLM_ROWS), None)


def tower_records(pruner) -> frozenset:
    """What the vision tower records for the pruner at its layers: a subset of {"cls", "keys", "values", "qk"}."""
    return frozenset(TOWER_RECORDS[n] for n in declared(pruner).of("tower") if n in TOWER_RECORDS)


def needs_tower(pruner) -> bool:
    """The method is meaningless without tower signals that need a CLS token (refused on families without a
    CLS tower)."""
    required = declared(pruner).of("tower", required=True)
    return any(TOWER_RECORDS.get(n) not in CLS_FREE for n in required)


def needs_hooked_tower(pruner) -> bool:
    """The method is meaningless without a tower record that needs no CLS token (``tower.received``): refused on
    families whose vision tower tokensieve does not hook."""
    return bool(declared(pruner).of("tower", required=True))


def frame_signal(pruner) -> str | None:
    """The frames-stage signal the pruner reads ("frames.relevance", "frames.clip"), or None."""
    return next(iter(sorted(declared(pruner).of("frames"))), None)


def instruction_embeds(adapter, tokenizer, question: str) -> torch.Tensor:
    """The question's tokens (no special tokens, no chat template) through the LLM's input embeddings -> [M, D]."""
    ids = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids  # [1, M]
    device = adapter.model.get_input_embeddings().weight.device
    return adapter.embed(ids.to(device))[0]
def wants_tower_feats(pruner) -> bool:
    """A pre_llm stage of the pruner reads the projector's input (``tower.features`` or ``tower.patches``)."""
    return reads(pruner, "tower.features") or reads(pruner, "tower.patches")


def keyword_embeds(adapter, pruner, question: str, options: dict) -> torch.Tensor:
    """[M, D] signal ``request.keywords``: the pruner's keyword text of ``question`` (image / video placeholders
    removed), its words tokenised with ``is_split_into_words`` (a leading BOS dropped), through the LLM's input
    embeddings (MMTok's ``_encode_text_with_token_pooling``)."""
    for token in (adapter.image_token, adapter.video_token):
        question = question.replace(token, " ") if token else question
    tok = adapter.processor.tokenizer
    ids = tok(pruner.keywords(" ".join(question.split()), options).split(), is_split_into_words=True,
              return_tensors="pt")["input_ids"][0]
    if ids.numel() > 1 and tok.bos_token_id is not None and int(ids[0]) == tok.bos_token_id:
        ids = ids[1:]
    device = adapter.model.get_input_embeddings().weight.device
    return adapter.embed(ids[None].to(device))[0]


def request_signals(adapter, run, question: str, tower_feats) -> dict:
    """A pre_llm stage's non-attention signals of one request: ``patches`` (the projector's input of the tokens
    entering, where the family gives it) and ``text_embeds`` (``keyword_embeds``), as the pruner reads them."""
    out = {}
    if reads(run.pruner, "tower.patches") and tower_feats is not None:
        out["patches"] = tower_feats
    if reads(run.pruner, "request.keywords"):
        out["text_embeds"] = keyword_embeds(adapter, run.pruner, question, run.stage.options)
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Each interleaved pair (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Undo rotary embeddings: x [B, H, S, d], cos/sin [B, S, r] (x_rot = x cos + rot(x) sin on the first r <= d
    dims, the rest passed through; ``layout``: rot pairs dims (i, i + r/2) "half", or (2i, 2i + 1) "interleaved")."""
    r = cos.shape[-1]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    rot = x[..., :r]
    turned = rotate_half(rot) if layout == "half" else rotate_pairs(rot)
    return torch.cat([rot * cos - turned * sin, x[..., r:]], dim=-1)



def record_tower(rec, layer: int, want, query, key, value, scale: float) -> None:
    """Record into ``rec`` (a TowerRecord) what ``want`` (a subset of {"cls", "keys", "values", "qk",
    "received"}) asks of vision layer ``layer``, from its query / key / value [n, H, S, d] (the engine's tower
    hooks, and the vLLM plugin's)."""
    if "cls" in want:
        rec.cls[layer], _ = attention_row(query[:, :, 0], key, scale=scale)
    if "keys" in want:
        rec.keys[layer] = key.float().mean(1)
    if "values" in want:  # FlowCut's value signals: [n, H, S] and [n, S]
        v = value.float()
        rec.value_attn[layer] = (v[:, :, :1] @ v.transpose(-1, -2))[:, :, 0].softmax(-1)
        rec.value_l1[layer] = v.mean(1).abs().sum(-1)
    if "qk" in want:
        rec.qk[layer] = (query.detach(), key.detach())
    if "received" in want:  # [n, S], one tile at a time (an [H, S, S] softmax each)
        got = torch.stack([(q.float() @ k.float().transpose(-1, -2) * scale).softmax(-1).mean((0, 1))
                           for q, k in zip(query, key.repeat_interleave(query.shape[1] // key.shape[1], 1))])
        rec.received[layer] = got

class SignalsMixin:
    """Methods of RequestState that record and hand out attention signals."""

    # ---- language model ---------------------------------------------------------------------
    def llm_need(self, layer: int) -> str | None:
        """What the stage before ``layer + 1`` needs from this layer's attention (prefill only)."""
        run = self.llm_stages.get(layer + 1) if self.prefill else None
        if run is None:
            return None
        rows = llm_rows(run.pruner)
        if rows == "last_query" and run.stage.options.get("scoring") == "eager":
            return "last_query_eager"
        return rows

    def last_query_weights(self, query: torch.Tensor) -> torch.Tensor:
        """[B, Sq] one-hot on the last prompt token (always valid: rows are left padded)."""
        w = torch.zeros(query.shape[0], query.shape[2], device=query.device)
        w[:, -1] = 1.0
        return w

    def record_rows(self, need: str, layer: int, query, key, mask, causal: bool, scale: float) -> None:
        """Exact softmax rows for 'last_query_norope' ([B, H, Sk]), 'text_rows' (per request [H, T, Sk]),
        'text_rows_full' (the same rows, RoPE removed, every valid key) or 'all_rows' (per request
        [H, S_valid, Sk]: every valid slot's row)."""
        rep = query.shape[1] // key.shape[1]
        if need == "last_query_norope":
            cos, sin = self.rope
            q = unrotate(query[:, :, -1:], cos[:, -1:], sin[:, -1:], self.rope_layout)
            k = unrotate(key, cos, sin, self.rope_layout)
            rows = [query.shape[2] - 1]
        elif need in ("text_rows", "all_rows"):
            q, k = query, key
            rows = None
        elif need == "text_rows_full":
            cos, sin = self.rope
            q, k = unrotate(query, cos, sin, self.rope_layout), unrotate(key, cos, sin, self.rope_layout)
            rows, causal = None, False
        else:
            raise ValueError(f"unknown attention need '{need}'")
        b, hq, sq, _ = query.shape
        sk = key.shape[2]
        out = []
        for i in range(b):
            if rows is None:
                own = self.valid[i].nonzero().flatten() if need == "all_rows" else self.text_rows(i)
            r = torch.tensor(rows if rows is not None else own.tolist(), device=query.device, dtype=torch.long)
            qi = q[i:i + 1] if need == "last_query_norope" else q[i:i + 1, :, r]
            logits = (qi.float() @ k[i:i + 1].float().repeat_interleave(rep, 1).transpose(-1, -2)) * scale
            allowed = full_mask(1, hq, sq, sk, causal, None if mask is None else mask[i:i + 1], r, query.device)
            if need == "text_rows_full":  # every valid key, later ones too
                allowed = self.valid[i, -sk:][None, None, None, :].expand(1, hq, r.numel(), sk)
            out.append(logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)[0])  # [H, R, Sk]
        self.importance[layer] = torch.stack([o[:, 0] for o in out]) if need == "last_query_norope" else out

    def text_rows(self, b: int) -> torch.Tensor:
        """Slots of request b's text tokens after its last visual token (the question and template)."""
        vis = (self.vis_orig[b] >= 0).nonzero().flatten()
        start = int(vis[-1]) + 1 if vis.numel() else 0
        slots = torch.arange(start, self.vis_orig.shape[1], device=self.vis_orig.device)
        return slots[self.valid[b, start:]]

    def llm_signals(self, run, imp, b: int, vis_slots: torch.Tensor) -> dict:
        """The pruner's inputs for request b from the recorded rows, restricted to its visual tokens."""
        extra = {"spans": self.spans(b, vis_slots.numel())} if reads(run.pruner, "video.spans") else {}
        if imp is None:
            return extra
        rows = llm_rows(run.pruner)
        if rows == "text_rows_full":
            return {"text_attn": imp[b][:, :, vis_slots], **extra}
        if rows == "text_rows":
            raters = self.raters.get(run.index)
            return {"text_attn": imp[b][:, :, vis_slots], "raters": None if raters is None else raters[b]}
        if rows == "all_rows":  # rows are the valid slots in order: take the same key columns
            valid = self.valid[b].nonzero().flatten()
            return {"seq_attn": imp[b][:, :, valid], "seq_vis": torch.searchsorted(valid, vis_slots)}
        return {"attn": imp[b][:, vis_slots]}

    def record_keys(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """Prefill, layer K-1 of a stage whose pruner reads ``llm.keys``: key [B, Hkv, S, d] (RoPE applied) ->
        ``layer_keys[layer]`` [B, S, Hq*d], KV heads repeated to the query heads (``repeat_kv``'s order)."""
        run = self.llm_stages.get(layer + 1) if self.prefill else None
        if run is None or not reads(run.pruner, "llm.keys"):
            return
        k = key.repeat_interleave(query.shape[1] // key.shape[1], 1)  # [B, Hq, S, d]
        self.layer_keys[layer] = k.permute(0, 2, 1, 3).flatten(2)

    def token_signals(self, run, layer: int, hidden: torch.Tensor, b: int, vis_slots: torch.Tensor) -> dict:
        """``llm.keys`` / ``llm.normed`` / ``llm.positions`` of request b for an LLM stage at ``layer``: its
        visual slots and its text slots (``text_rows``); hidden [B, S, D] enters ``layer``."""
        out, text = {}, self.text_rows(b)
        if reads(run.pruner, "llm.keys"):
            keys = self.layer_keys[layer - 1][b]
            out.update(llm_keys=keys[vis_slots], text_keys=keys[text])
        if reads(run.pruner, "llm.normed"):
            out.update(normed=self.final_norm(hidden[b, vis_slots]), text_normed=self.final_norm(hidden[b, text]))
        if reads(run.pruner, "llm.positions"):
            first = self.seq[b, self.valid[b]].min()  # the prompt's first token (text: never pruned)
            out.update(positions=self.seq[b, vis_slots] - first, text_positions=self.seq[b, text] - first)
        return out

    def spans(self, b: int, n_alive: int) -> torch.Tensor | None:
        """[n_alive, 2] first and last frame of the original tokens each alive token of request b stands for
        (-1, -1: no video token); None without per-token frames."""
        if not self.frames or self.frames[b] is None:
            return None
        own, fr = self.owner[b], self.frames[b].to(self.owner[b].device)
        out = torch.full((n_alive, 2), -1, dtype=torch.long)
        live = (own >= 0) & (fr >= 0)
        if live.any():
            big = torch.full((n_alive,), torch.iinfo(torch.long).max, dtype=torch.long)
            out[:, 0] = big.scatter_reduce(0, own[live], fr[live], "amin")
            out[:, 1] = out[:, 1].scatter_reduce(0, own[live], fr[live], "amax")
            out[out[:, 0] == big[0], 0] = -1
        return out

    def pick_raters(self, hidden: torch.Tensor) -> None:
        """Before decoder layer 0 (prefill), hidden [B, S, D] = the LLM's input embeddings: the text raters
        of every request for each LLM stage whose pruner reads ``llm.text_raters``."""
        for run in self.llm_stages.values():
            if reads(run.pruner, "llm.text_raters"):
                self.raters[run.index] = [run.pruner.text_raters(hidden[b, self.vis_orig[b] >= 0],
                                                                 hidden[b, self.text_rows(b)])
                                          for b in range(self.batch_size)]

    # ---- vision tower -----------------------------------------------------------------------
    def record_vision(self, layer: int, query, key, value, scale: float) -> None:
        """query/key/value [n, H, S, d] of vision layer ``layer``: record what the stages asked for."""
        record_tower(self.tower, layer, self.tower_wants.get(layer, ()), query, key, value, scale)

    def tower_signals(self, run, layers: list[int] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(tower_score [n, S - prefix], keys [n, S - prefix, d]) of a stage (from ``layers``, default all its
        tower layers), or Nones where not recorded."""
        layers = run.tower_layers if layers is None else layers
        if not layers or self.tower is None:
            return None, None
        needs = tower_records(run.pruner)
        score = run.pruner.tower_score(self.tower, layers) if needs - {"keys"} else None
        keys = self.tower.keys[layers[-1]][:, self.tower.prefix:] if "keys" in needs else None
        return score, keys
