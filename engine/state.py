"""Per-call pruning state: it travels through the model as the ``tokensieve_state`` kwarg.

transformers forwards unknown kwargs from the top-level forward down to every decoder
layer and attention function, so the hooks and the registered attention function read
the state from there. Nothing is stored on modules or at module level: a state lives
for one generate call and then holds that call's records (kept sets, scores, merge groups).

Sequence bookkeeping for one padded batch (B rows). Every token keeps the *slot* it had
in the prefill layout (``seq``), so causality after pruning is simply ``seq_k <= seq_q``;
decode tokens get slots after the prefill length.

Merge bookkeeping per request: ``owner[o]`` is the position, in the list of visual tokens
currently alive, of the token that original token ``o`` is now part of (-1: dropped).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..pruners import Pruner, Selection, StageInput, TowerRecord
from . import budget
from .errors import PlanError
from .plan import Stage
from .sequence import gather_seq, left_pad_index, pad_rows
from .signals import SignalsMixin

STATE_KWARG = "tokensieve_state"


@dataclass
class StageRun:
    """One stage of the plan as it runs in this call."""

    index: int
    stage: Stage
    pruner: Pruner
    keep: list[int]  # per request row (vision stages: per image)
    tower_layers: list[int] = field(default_factory=list)  # vision layers its tower signals come from
    steps: list[int] = field(default_factory=list)  # vision stages: the layers it prunes before (progressive: several)
    carry: list = field(default_factory=list)  # progressive stages: per image, the pruner's running state
    entering: list = field(default_factory=list)  # LLM stages of several steps: per request, originals entering
    scores_of: list = field(default_factory=list)  # the same: per request, scores over those, each token's latest
    alive_at: list = field(default_factory=list)  # the same: per request, {layer: visual tokens entering it}


@dataclass
class RequestState(SignalsMixin):
    batch_size: int
    seed: int = 0
    vision_stages: dict[int, StageRun] = field(default_factory=dict)  # vision layer -> stage
    llm_stages: dict[int, StageRun] = field(default_factory=dict)  # LLM layer -> stage
    pre_llm_stages: list[StageRun] = field(default_factory=list)
    prefill: bool = True
    # records, per stage index: list over requests
    kept: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    scores: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)
    groups: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    owner: list[torch.Tensor] = field(default_factory=list)  # per request [N_vis]
    # vision side: per image, original patch indices alive and their owner request
    vision_layer_of: dict[int, int] = field(default_factory=dict)  # id(attn module) -> vision layer
    tower: TowerRecord | None = None
    video_tower: TowerRecord | None = None  # the same records of the native-video tower pass (``tower.received``)
    tower_wants: dict[int, set] = field(default_factory=dict)  # vision layer -> signals to record
    image_owner: list[int] = field(default_factory=list)
    image_alive: list[torch.Tensor] = field(default_factory=list)
    image_coords: list[torch.Tensor] = field(default_factory=list)  # [P, 3] per image
    image_offset: list[int] = field(default_factory=list)  # first visual index of each image in its request
    tower_patches: dict[int, list[list[int]]] = field(default_factory=dict)  # vision layer -> per request, per image
    tower_feats: list = field(default_factory=list)  # per request [N_b, D_tower] projector input, or None
    tower_mask: torch.Tensor | None = None  # [n_img, S] keys of the padded tower batch (keep=auto vision stages)
    # LLM side: [B, S] slot of each current token, validity, original visual index (-1: text/pad)
    seq: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    vis_orig: torch.Tensor | None = None
    coords: list[torch.Tensor] = field(default_factory=list)  # per request [N_vis, 3]
    frames: list = field(default_factory=list)  # per request [N_vis] frame of each visual token (-1: image), or None
    llm_depth: int | None = None  # decoder layers of the language model
    key_seq: dict[int, torch.Tensor] = field(default_factory=dict)  # per LLM stage layer: its segment's cache
    key_valid: dict[int, torch.Tensor] = field(default_factory=dict)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # per stage layer: this forward's mask
    importance: dict[int, object] = field(default_factory=dict)  # layer -> [B, H, Sk] or per-row list
    raters: dict[int, list] = field(default_factory=dict)  # LLM stage index -> per request [T] bool text raters
    rope: tuple | None = None  # (cos, sin) [B, S, d] of the current tokens, for RoPE-free scores
    rope_layout: str = "half"  # how the LLM pairs the rotated dims (``Adapter.rope_layout``)
    layer_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer K-1 -> [B, S, Hq*d] (``llm.keys``)
    final_norm: object = None  # the LLM's final norm module (``llm.normed``), set by the engine when a stage reads it
    next_slot: int = 0
    prefill_index: torch.Tensor | None = None  # [B, S] current tokens' columns in the LLM's prefill input
    frame_scoring: list = field(default_factory=list)  # frames stages' scoring passes (engine.frames.FrameScores)
    budgets: dict[int, list] = field(default_factory=dict)  # keep=auto stage index -> per request its budget record
    mask_rules: object = None  # the adapter: each layer's mask kind and rule (``Adapter.allowed``), None: causal
    own_masks: bool = False  # every layer gets this state's mask (from layer 0), not only those after a stage
    slot_groups: torch.Tensor | None = None  # [B, L] per original slot its two-way attention group (-1: none)

    @property
    def first_pruned_layer(self) -> int | None:
        return min(self.llm_stages) if self.llm_stages else None

    # ---- selection and its records -----------------------------------------------------------
    def select(self, run: StageRun, keep: int | None, tokens, coords, attn=None, request: int | None = None,
               budget_frames=None, at_least: bool = False, image: int | None = None, **signals) -> Selection:
        """Run a stage's pruner on one request's tokens [N, D] (``request``: its row, for the budget records;
        ``image``: at a vision stage, the image's index in the request, one budget record each;
        ``budget_frames`` [N]: the tokens' frames for a keep=auto rule where the pruner is not given them;
        ``at_least``: a step before a multi-step stage's last may keep more than ``keep``)."""
        auto = run.stage.budget is not None
        if keep is None and not auto:  # after an adaptive / frames stage: resolve now
            keep = run.stage.keep_count(tokens.shape[0])
            if keep is not None and keep > tokens.shape[0]:
                raise PlanError(f"stage {run.index} ({run.stage.describe()}): keep={run.stage.keep} is larger than "
                                f"the {tokens.shape[0]} visual tokens entering it")
        inp = StageInput(tokens=tokens, keep=keep, coords=coords, attn=attn, options=run.stage.options,
                         seed=self.seed, **signals)
        if auto:  # the budget from the request's own tokens (engine/budget.py), then the pruner keeps that many
            frames = budget_frames if budget_frames is not None else signals.get("frames")
            sel, rec = budget.choose(run.stage.budget, tokens, coords, frames,
                                     lambda k: run.pruner.select(dataclasses.replace(inp, keep=k)))
            keep = None if rec["rule"] == "own" and rec["clipped"] is None else rec["kept"]
            if request is not None:
                per_request = self.budgets.setdefault(run.index, [None] * self.batch_size)
                per_request[request] = rec if image is None else [*(per_request[request] or []), dict(image=image, **rec)]
        else:
            sel = run.pruner.select(inp)
        check_selection(sel, tokens.shape[0], keep, run.stage.describe(), at_most=run.stage.where == "frames",
                        at_least=at_least)
        return sel

    def follow_tower_feats(self, b: int, sel: Selection, merged_before_projector: bool) -> None:
        """Keep request b's projector inputs aligned with its surviving tokens (None once a stage merged
        after the projector: those tokens have no projector input)."""
        if not self.tower_feats or self.tower_feats[b] is None:
            return
        if sel.tokens is None:
            self.tower_feats[b] = self.tower_feats[b][sel.keep_idx]
        else:
            self.tower_feats[b] = sel.tokens if merged_before_projector else None

    def sizes(self, b: int, n_alive: int) -> torch.Tensor:
        """[n_alive] how many original tokens each alive token of request b stands for."""
        own = self.owner[b]
        return torch.bincount(own[own >= 0], minlength=n_alive).float()

    def record(self, run: StageRun, b: int, entering: torch.Tensor, sel: Selection) -> torch.Tensor:
        """Record request b's result of a stage; ``entering``: [n_in] original indices, sorted. Returns kept originals."""
        keep_idx = sel.keep_idx.cpu()
        groups = sel.groups.cpu() if sel.groups is not None else identity_groups(keep_idx, entering.numel())
        own = self.owner[b]
        alive = own >= 0
        own[alive] = groups[own[alive]]
        kept = entering[keep_idx]
        for store, value in ((self.kept, kept), (self.groups, own.clone()),
                             (self.scores, None if sel.scores is None else sel.scores.detach().float().cpu())):
            store.setdefault(run.index, [None] * self.batch_size)[b] = value
        return kept

    # ---- vision-encoder-layer pre-hook ---------------------------------------------------------
    def before_vision_layer(self, layer: int, hidden: torch.Tensor, prefix: int) -> torch.Tensor:
        """Prune patch tokens of every image before vision layer ``layer``.

        hidden: [n_img, prefix + P, D] (prefix tokens, e.g. CLS, always stay; image i's patches are its first
        ``len(image_alive[i])`` rows after them, the rest padding) -> [n_img, prefix + k_max, D], image i's k_i
        kept rows first, zero rows after them when the images keep different counts (``tower_mask``)."""
        run = self.vision_stages.get(layer)
        if run is None:
            return hidden
        left, layers = self._vision_step(run, layer)
        tower_score, keys = self.tower_signals(run, layers)
        keeps = self._step_keeps(run, left, hidden, prefix, tower_score)
        per_request = [([], [], [], []) for _ in range(self.batch_size)]  # entering, keep_idx, groups, scores
        n_alive = [sum(len(a) for a, o in zip(self.image_alive, self.image_owner) if o == b) for b in range(self.batch_size)]
        sizes = [self.sizes(b, n) for b, n in enumerate(n_alive)]  # merge sizes over each request's alive tokens
        new_rows = []
        for i, alive in enumerate(self.image_alive):
            entering, keep_idx, groups, scores = per_request[self.image_owner[i]]
            n_in, n_kept = sum(map(len, entering)), sum(map(len, keep_idx))
            patches = hidden[i, prefix:prefix + alive.numel()]  # [P_i, D] without the padding
            sel = self.select(run, keeps[i], patches, self.image_coords[i][alive],
                              tower_score=None if tower_score is None else tower_score[i, :alive.numel()],
                              keys=None if keys is None else keys[i, :alive.numel()],
                              sizes=sizes[self.image_owner[i]][n_in:n_in + len(alive)], prefix=prefix,
                              layers_left=left, carry=run.carry[i] if left is not None else None,
                              request=self.image_owner[i], image=len(entering))
            if left is not None:
                run.carry[i] = sel.carry
            idx = sel.keep_idx.cpu()
            g = sel.groups.cpu() if sel.groups is not None else identity_groups(idx, alive.numel())
            entering.append(self.image_offset[i] + alive)
            keep_idx.append(idx + n_in)
            groups.append(torch.where(g >= 0, g + n_kept, -1))
            scores.append(sel.scores)
            self.image_alive[i] = alive[idx]
            rows = patches[sel.keep_idx] if sel.tokens is None else sel.tokens.to(hidden.dtype)
            new_rows.append(torch.cat([hidden[i, :prefix], rows]))
        for b, (entering, keep_idx, groups, scores) in enumerate(per_request):
            if entering:
                sel = Selection(keep_idx=torch.cat(keep_idx), groups=torch.cat(groups),
                                scores=None if any(x is None for x in scores) else torch.cat([x.cpu() for x in scores]))
                prev = self.scores.get(run.index, [None] * self.batch_size)[b] if left is not None else None
                self.record(run, b, torch.cat(entering), sel)
                if prev is not None and sel.scores is not None:  # a later step: its tokens' scores are the latest
                    prev = prev.clone()  # (a progressive stage is the only vision stage: its first step saw 0..N-1)
                    prev[torch.cat(entering)] = self.scores[run.index][b]
                    self.scores[run.index][b] = prev
        self.tower_patches[layer] = [[len(a) for a, o in zip(self.image_alive, self.image_owner) if o == b]
                                     for b in range(self.batch_size)]
        padded, self.tower_mask = pad_rows(new_rows)
        return padded

    def tower_attention_mask(self) -> torch.Tensor | None:
        """[n_img, 1, 1, S] boolean SDPA mask of the padded tower batch (True: a real key), None when unpadded."""
        return None if self.tower_mask is None else self.tower_mask[:, None, None, :]

    def unpad_images(self, per_image: list | None) -> list | None:
        """Per image [k_max, D] tower outputs (features or projector inputs) -> [k_i, D]: the padding dropped."""
        if per_image is None or self.tower_mask is None:
            return per_image
        return [x[:a.numel()] for x, a in zip(per_image, self.image_alive)]

    def _vision_step(self, run: StageRun, layer: int) -> tuple[int | None, list[int] | None]:
        """(layers_left, the tower layers read) of a progressive stage's step before vision ``layer``: the
        layers since its previous step; (None, None) for a one-step stage (all its tower layers)."""
        if not run.pruner.progressive:
            return None, None
        if not run.carry:
            run.carry = [None] * len(self.image_alive)
        prev = max((s for s in run.steps if s < layer), default=0)
        return run.steps[-1] - layer, [j for j in run.tower_layers if prev <= j < layer]

    def _step_keeps(self, run: StageRun, left: int | None, hidden, prefix: int, tower_score) -> list[int]:
        """Per image, the tokens a step keeps: the stage's keep, except before a progressive stage's last step,
        where the images of the tower batch (one length) keep the smallest of the pruner's proposals."""
        if not left:
            return run.keep
        proposals = [run.pruner.step_keep(StageInput(
            tokens=hidden[i, prefix:], keep=run.keep[i], coords=self.image_coords[i][alive], options=run.stage.options,
            seed=self.seed, tower_score=None if tower_score is None else tower_score[i], layers_left=left,
            carry=run.carry[i])) for i, alive in enumerate(self.image_alive)]
        return [max(min(proposals), max(run.keep))] * len(proposals)

    # ---- decoder-layer pre-hook ------------------------------------------------------------
    def before_llm_layer(self, layer: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Prune at a stage layer (prefill), then give layers past the first stage their own mask."""
        if layer == 0 and self.prefill:
            self.pick_raters(hidden)
        first = self.first_pruned_layer
        masks_from = 0 if self.own_masks else first  # the first layer given this state's mask
        if masks_from is None or (layer < masks_from and layer < first - 1):
            return hidden
        if self.prefill and self.prefill_index is not None:
            # every layer receives the model's full-length rotary tables and position ids: cut them down
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (gather_seq(cos, self.prefill_index), gather_seq(sin, self.prefill_index))
            if isinstance(kwargs.get("position_ids"), torch.Tensor):
                kwargs["position_ids"] = gather_seq(kwargs["position_ids"], self.prefill_index)
        if self.prefill and layer in self.llm_stages:
            hidden = self._prune_llm(self.llm_stages[layer], layer, hidden, kwargs)
        self.rope = kwargs.get("position_embeddings")
        if layer >= masks_from:
            kwargs["attention_mask"] = self._layer_mask(layer)
        return hidden

    def _layer_mask(self, layer: int) -> torch.Tensor:
        """Boolean SDPA mask [B, 1, Sq, Sk] for this layer's cache after appending the current tokens.

        The layers from one LLM stage to the next (segment 0: those before the first, where ``own_masks``) hold
        the same tokens, so they share one cache layout; layers of one kind (``mask_rules.mask_kind``) share
        one mask, built at the first of them in each forward: the rule on the tokens' original slots and groups
        (``mask_rules.allowed``, causal without rules) over the keys that kind's cache returns (``visible_keys``)."""
        seg = max((k for k in self.llm_stages if k <= layer), default=0)
        kind = self.mask_rules.mask_kind(layer) if self.mask_rules is not None else "causal"
        if (seg, kind) in self.masks:
            return self.masks[(seg, kind)]
        if not any(s == seg for s, _ in self.masks):  # the segment's first layer in this forward
            if seg in self.key_seq:
                self.key_seq[seg] = torch.cat([self.key_seq[seg], self.seq], dim=1)
                self.key_valid[seg] = torch.cat([self.key_valid[seg], self.valid], dim=1)
            else:
                self.key_seq[seg], self.key_valid[seg] = self.seq, self.valid
        ks, kv = self.key_seq[seg], self.key_valid[seg]
        if self.mask_rules is None:
            mask, n_keys = ks[:, None, :] <= self.seq[:, :, None], ks.shape[1]
        else:
            mask = self.mask_rules.allowed(kind, self.seq, ks, self._groups(self.seq), self._groups(ks))
            n_keys = self.mask_rules.visible_keys(kind, ks.shape[1] - self.seq.shape[1], self.seq.shape[1])
        mask = mask & kv[:, None, :]
        mask |= ~self.valid[:, :, None]  # padding queries attend everywhere: finite, never read
        self.masks[(seg, kind)] = mask[:, None, :, ks.shape[1] - n_keys:]
        return self.masks[(seg, kind)]

    def _groups(self, seq: torch.Tensor) -> torch.Tensor | None:
        """[B, S] the two-way attention group of each slot in ``seq`` (decode slots, past the prefill: -1)."""
        if self.slot_groups is None:
            return None
        n = self.slot_groups.shape[1]
        return torch.where(seq < n, self.slot_groups.gather(1, seq.clamp(max=n - 1)), -1)

    def _prune_llm(self, run: StageRun, layer: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        imp = self.importance.pop(layer - 1, None)
        hidden_in = hidden
        keep_slots = []
        for b in range(self.batch_size):
            vis_slots = (self.vis_orig[b] >= 0).nonzero().flatten()
            orig = self.vis_orig[b, vis_slots].cpu()
            signals = {**self.llm_signals(run, imp, b, vis_slots),
                       **self.token_signals(run, layer, hidden_in, b, vis_slots),
                       **self._llm_step(run, layer, b, orig)}  # frames (the keep=auto rules read them too)
            sel = self.select(run, run.keep[b], hidden[b, vis_slots], self.coords[b][orig],
                              sizes=self.sizes(b, vis_slots.numel()), request=b, **signals)
            if len(run.steps) > 1:
                run.carry[b] = sel.carry
                run.alive_at[b][layer] = int(sel.keep_idx.numel())
            if sel.tokens is not None:  # merged tokens: write into a copy, never the caller's tensor
                hidden = hidden.clone() if hidden is hidden_in else hidden
                hidden[b, vis_slots[sel.keep_idx]] = sel.tokens.to(hidden.dtype)
            self.record(run, b, orig, sel)
            self._step_scores(run, b, orig)
            keep_mask = self.valid[b] & (self.vis_orig[b] < 0)
            keep_mask[vis_slots[sel.keep_idx]] = True
            keep_slots.append(keep_mask.nonzero().flatten())
        self.layer_keys.pop(layer - 1, None)
        index, valid = left_pad_index(keep_slots, hidden.device)  # [B, S'] each
        self.seq = self.seq.gather(1, index)
        self.vis_orig = torch.where(valid, self.vis_orig.gather(1, index), -1)
        self.valid = valid
        self.prefill_index = index if self.prefill_index is None else self.prefill_index.gather(1, index)
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (gather_seq(cos, index), gather_seq(sin, index))
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            kwargs["position_ids"] = gather_seq(kwargs["position_ids"], index)
        return gather_seq(hidden, index)

    def _llm_step(self, run: StageRun, layer: int, b: int, orig: torch.Tensor) -> dict:
        """StageInput fields of request b at LLM ``layer``: its tokens' frames and the LLM depth; for a stage of
        several steps also ``layers_left``, ``carry`` and ``at_least`` (before its last step)."""
        frames = self.frames[b] if self.frames else None
        out = {"frames": None if frames is None else frames[orig], "llm_layers": self.llm_depth}
        if len(run.steps) > 1:
            if not run.carry:
                run.carry, run.entering, run.scores_of = ([None] * self.batch_size for _ in range(3))
                run.alive_at = [{} for _ in range(self.batch_size)]
            if run.entering[b] is None:
                run.entering[b] = orig
            out.update(layers_left=run.steps[-1] - layer, carry=run.carry[b], at_least=layer != run.steps[-1])
        return out

    def _step_scores(self, run: StageRun, b: int, orig: torch.Tensor) -> None:
        """A stage of several steps: its scores over the tokens entering its first step, each token's latest."""
        new = self.scores[run.index][b]
        if len(run.steps) < 2 or new is None:
            return
        if run.scores_of[b] is None:
            run.scores_of[b] = torch.zeros(run.entering[b].numel())
        run.scores_of[b][torch.searchsorted(run.entering[b], orig)] = new
        self.scores[run.index][b] = run.scores_of[b].clone()

    # ---- decode ------------------------------------------------------------------------------
    def start_decode(self, n_new: int, device) -> None:
        """The next forward carries ``n_new`` fresh tokens per row (all valid)."""
        self.prefill = False
        self.masks = {}  # a new forward: each segment's mask is built again, once
        slots = torch.arange(self.next_slot, self.next_slot + n_new, device=device)
        self.seq = slots.expand(self.batch_size, n_new)
        self.valid = torch.ones(self.batch_size, n_new, dtype=torch.bool, device=device)
        self.vis_orig = torch.full((self.batch_size, n_new), -1, dtype=torch.long, device=device)
        self.next_slot += n_new


def identity_groups(keep_idx: torch.Tensor, n: int) -> torch.Tensor:
    """[n] groups of a plain selection: kept tokens map to their own position, the rest to -1."""
    g = torch.full((n,), -1, dtype=torch.long)
    g[keep_idx] = torch.arange(keep_idx.numel())
    return g


def check_selection(sel: Selection, n: int, keep: int | None, label: str, at_most: bool = False,
                    at_least: bool = False) -> None:
    """A pruner's result is well formed: ``keep`` sorted unique indices (``at_most``: 1..keep of them;
    ``at_least``: keep..n of them, a step before the last of an LLM stage of several steps)."""
    idx = sel.keep_idx
    wrong_count = keep is not None and (not 1 <= idx.numel() <= keep if at_most else
                                        not keep <= idx.numel() <= n if at_least else idx.numel() != keep)
    if wrong_count or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
        raise RuntimeError(f"{label}: pruner returned {idx.numel()} indices (want {keep}, sorted, unique)")
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= n):
        raise RuntimeError(f"{label}: pruner returned an index outside [0, {n})")
    if sel.tokens is not None and sel.tokens.shape[0] != idx.numel():
        raise RuntimeError(f"{label}: pruner returned {sel.tokens.shape[0]} merged tokens for {idx.numel()} kept")
    if sel.groups is not None and (sel.groups.numel() != n or not bool((sel.groups[idx] == torch.arange(
            idx.numel(), device=sel.groups.device)).all())):
        raise RuntimeError(f"{label}: merge groups must cover the {n} entering tokens and map kept tokens to themselves")
