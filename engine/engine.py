"""The Engine: one loaded model, its adapter, its hooks, and the generate path.

    engine = tokensieve.load("path/or/hub-id", plan="fastv:layer=2,keep=0.25")
    result = engine.generate("what colour is the circle?", images=["scene.png"])
    result.text, result.kept, result.scores, result.stats

A call runs: check inputs -> decode videos (ahead, in a pool) -> processor -> vision tower
(vision stages hook its layers) -> frames and pre-LLM stages -> rebuild the LLM inputs
-> prefill (LLM stages hook decoder layers) -> decode. Every stage records, per request, the kept indices in the request's original
visual-token coordinates.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from transformers import DynamicCache

from ..pruners import TowerRecord, get_pruner
from . import attention, frames, hooks
from .adapters import Adapter, adapter_for
from .batch import Batch, assemble, build_batch, process
from .errors import InputError, named
from .fit import check_fit, contiguous_positions, tower_layers, vision_layer
from .generation import (DecodeOptions, cache_kwargs, decode_one_token, end_of_sequence_ids, forced_logprob,
                         next_positions, prefill, sample)
from .plan import Plan
from .pre_llm import run_pre_llm_stages
from .request import DEFAULT_VIDEO_FRAMES, VIDEO_MODES, CheckedRequest, Request, check_request
from .video import VideoPrefetcher
from .vocabulary import read_trained_words
from .results import Result, answer_length, answer_text, build_results
from .signals import reads, tower_records, wants_tower_feats
from .sequence import left_pad_index, renumbered
from .state import STATE_KWARG, RequestState, StageRun


class Engine:
    def __init__(self, model, processor, plan: Plan | str | None = None, max_new_tokens: int = 32,
                 video_mode: str = "native", frame_models=None):
        """``frame_models``: what loads the models frames stages score with besides this one (QuoTA's
        ``scorer=PATH``, KeyScore's ``clip=``), e.g. ``tokensieve.FrameModels()`` (``tokensieve.load`` hands one
        in); None: such a stage is refused, naming what to pass (``engine/frames.py``). The engine closes it."""
        if video_mode not in VIDEO_MODES:
            raise InputError(f"video_mode must be one of {VIDEO_MODES}, got {video_mode!r}")
        self.video_mode = video_mode
        self.frame_scorers = frames.FrameScorers(self, frame_models)  # the frames stages' scorers and their models
        self.model = model.eval()
        self.processor = processor
        self.adapter: Adapter = adapter_for(model, processor)
        self.plan = Plan.parse(plan)
        self.max_new_tokens = max_new_tokens
        self.trained_words = read_trained_words(getattr(model, "name_or_path", None))  # None: not declared
        self.check_plan(self.plan)
        tok = processor.tokenizer  # read, never changed: batches are padded left per call (batch.process)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.eos_ids = end_of_sequence_ids(model.generation_config.eos_token_id, tok.eos_token_id)
        # scoring layers need the tokensieve attention function (SDPA plus the rows a pruner reads)
        towers = ["text_config"] + (["vision_config"] if self.adapter.cls_tower else [])
        self._attn_before = {t: getattr(model.config, t)._attn_implementation for t in towers}
        self.model.set_attn_implementation({t: attention.register() for t in towers})
        prefix = self.adapter.vision_prefix
        self._handles = hooks.install(self.adapter.llm_layers, self.adapter.vision_layers if prefix is not None else None,
                                      prefix or 0)
        if not self.adapter.cls_tower and self.adapter.vision_layers is not None:  # CLS-free records (SigLIP)
            self._handles += hooks.install_tower_records(self.adapter.tower_attention_modules())
        self._handles += self.adapter.install_hooks(STATE_KWARG)  # the family's own (Qwen3-VL: DeepStack)

    # ---- public API -----------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook this engine installed; the model is plain transformers again. The engine
        refuses further calls."""
        self._closed = True
        for h in self._handles:
            h.remove()
        self.frame_scorers.close()
        if self._handles:
            self.model.set_attn_implementation({t: (a if a and a != attention.ATTN_NAME else "sdpa")
                                                for t, a in self._attn_before.items()})
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def prepare(self, prompt: str, images=None, video=None, video_mode: str | None = None) -> dict:
        """The exact model inputs (processor output, chat template applied) that ``generate`` uses."""
        return self.prepare_batch([Request(prompt=prompt, images=images or [], video=video, video_mode=video_mode)])

    def prepare_batch(self, requests: list) -> dict:
        """The padded model inputs ``generate_batch`` builds for these requests (one batch)."""
        self._check_open()
        return process(self.processor, self.adapter, [self._check(Request.of(r), Plan()) for r in requests])

    def generate(self, prompt: str, images=None, video=None, plan=None, max_new_tokens: int | None = None,
                 video_mode: str | None = None, priority=None, **generation_kwargs) -> Result:
        req = Request(prompt=prompt, images=images or [], video=video, plan=plan, max_new_tokens=max_new_tokens,
                      video_mode=video_mode, priority=priority)
        return self.generate_batch([req], **generation_kwargs)[0]

    def stream(self, prompt: str, images=None, video=None, plan=None, max_new_tokens: int | None = None,
               video_mode: str | None = None, **generation_kwargs):
        """Yield the answer as it is decoded (str pieces that join to its text), then the full Result: the
        same tokens as ``generate`` with the same arguments. Inputs are checked before any model work."""
        self._check_open()
        options = DecodeOptions.from_kwargs(generation_kwargs)
        req = Request(prompt=prompt, images=images or [], video=video, plan=plan, max_new_tokens=max_new_tokens,
                      video_mode=video_mode)
        batch = build_batch(self.processor, self.adapter, [0], [self._check(req, self.plan)])
        return self._stream(batch, options)

    @torch.inference_mode()
    def _stream(self, batch: Batch, options: DecodeOptions):
        t0 = time.perf_counter()
        logits, attn, pos, cache, state, n_text = self._prefill(batch)
        prefill_s = time.perf_counter() - t0
        scoring_s = sum(s.seconds for s in state.frame_scoring) if state is not None else 0.0
        steps = self._decode_steps(logits, attn, pos, cache, state, options, batch.reqs[0].max_new_tokens)
        tokens, all_logits, shown, decode_s = [], [], "", 0.0
        while True:
            t = time.perf_counter()
            step = next(steps, None)  # time spent in the consumer between pieces is not decode time
            decode_s += time.perf_counter() - t
            if step is None:
                break
            tokens.append(step[0])
            if options.output_logits:
                all_logits.append(step[1].cpu())
            ids = torch.cat(tokens).tolist()
            text = answer_text(self, ids[:answer_length(ids, self.eos_ids)])
            if text.startswith(shown) and len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        result = build_results(self, batch, state, torch.stack(tokens, dim=1),
                               torch.stack(all_logits, dim=1) if all_logits else None, n_text,
                               prefill_s - scoring_s, decode_s)[0]
        if result.text != shown and result.text.startswith(shown):
            yield result.text[len(shown):]
        yield result

    @torch.inference_mode()
    def loglikelihood(self, prompt: str, continuation: str, images=None, video=None, plan=None,
                      video_mode: str | None = None) -> tuple[float, bool]:
        """(log P(continuation | prompt and visuals) under the plan, whether greedy decoding gives exactly it).
        The continuation's tokens follow the chat-formatted prompt (as the answer would); an empty one is (0, True)."""
        self._check_open()
        req = Request(prompt=prompt, images=images or [], video=video, plan=plan, video_mode=video_mode)
        if not isinstance(continuation, str):
            raise InputError(f"continuation must be a string, got {type(continuation).__name__}")
        batch = build_batch(self.processor, self.adapter, [0], [self._check(req, self.plan)])
        tokens = self.processor.tokenizer(continuation, add_special_tokens=False).input_ids
        logits, attn, pos, cache, state, _ = self._prefill(batch)
        return forced_logprob(self.model, self.adapter.embed, tokens, logits, attn, pos[..., -1:], cache, state)

    def generate_batch(self, requests: list, batch_size: int = 8, progress: bool = False, plan=None,
                       max_new_tokens: int | None = None, **generation_kwargs) -> list[Result]:
        """Requests (Request or dicts) -> Results in the same order, run as padded batches.

        ``plan`` and ``max_new_tokens`` are the defaults of the requests that do not set their own (else the
        engine's). Requests that share a plan and max_new_tokens share a batch. Every request is
        checked before any model work starts (videos are probed, not decoded); each batch's
        videos are decoded in a background pool while the batch before it runs. ``progress``
        shows a bar over the batches.
        """
        from tqdm import tqdm

        self._check_open()
        options = DecodeOptions.from_kwargs(generation_kwargs)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool)
                                           or max_new_tokens < 1):
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not isinstance(requests, (list, tuple)) or not requests:
            raise InputError(f"requests must be a non-empty list of Request or dicts, got {requests!r:.80}")
        default_plan = self.plan if plan is None else Plan.parse(plan)
        self.check_plan(default_plan)
        defaults = dict(default_plan=default_plan, default_max_new=max_new_tokens)
        reqs = [named(i, len(requests), Request.of, r) for i, r in enumerate(requests)]
        checked = [named(i, len(reqs), self._check, r, decode=False, **defaults) for i, r in enumerate(reqs)]
        groups = list(self._group(checked, batch_size))
        # batches without a video are built (processor run, budgets checked) before any model work; a
        # video's token count is known once it is decoded, so those batches are built as their turn comes
        ready = {k: build_batch(self.processor, self.adapter, idx, group) for k, (idx, group) in enumerate(groups)
                 if all(r.video is None for r in group)}
        results: dict[int, Result] = {}
        with VideoPrefetcher() as videos:
            def submit(k):
                for i in groups[k][0] if k < len(groups) and k not in ready else []:
                    if reqs[i].video is not None:
                        videos.submit(i, reqs[i].video, DEFAULT_VIDEO_FRAMES)
            submit(0)
            for k, (idx, _) in enumerate(tqdm(groups, desc="batches", disable=not progress)):
                submit(k + 1)
                batch = ready.pop(k, None) or build_batch(self.processor, self.adapter, idx, [
                    named(i, len(reqs), self._check, reqs[i], **defaults,
                          video=videos.result(i) if reqs[i].video is not None else None) for i in idx])
                for i, res in zip(idx, self._run(batch, options)):
                    results[i] = res
        return [results[i] for i in range(len(checked))]

    # ---- checking -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise InputError("this engine is closed (close() removed its hooks); load a new one")

    def check_plan(self, plan: Plan | str) -> None:
        """Raise PlanError when a plan does not fit this model (stage order, layers, CLS needs, frames stages)."""
        plan = Plan.parse(plan)
        check_fit(self.adapter, plan)
        for i, stage in enumerate(plan.stages):
            frames.check_stage(self, i, stage)

    def _check(self, req: Request, default_plan: Plan, video=None, decode: bool = True,
               default_max_new: int | None = None) -> CheckedRequest:
        """Check a request; ``video``: its video already decoded; ``decode=False``: only probe the video.
        A text-only request runs unpruned (there is nothing to prune): its plan is checked, then dropped."""
        checked = check_request(req, self.processor, self.adapter, default_plan, default_max_new or self.max_new_tokens,
                                self.video_mode, video=video, decode=decode)
        self.check_plan(checked.plan)
        if not checked.images and checked.video is None and checked.plan:
            checked = dataclasses.replace(checked, plan=Plan(), priority=None)
        return checked

    def _group(self, reqs: list[CheckedRequest], batch_size: int):
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):  # one plan and length per batch; one frame count where the processor stacks
            # videos; native videos apart where one processor call cannot take images and videos (SmolVLM)
            frames = len(r.video.indices) if r.native_video and self.adapter.stacks_videos else None  # planned
            apart = r.native_video and not self.adapter.video_with_images
            groups.setdefault((str(r.plan), r.max_new_tokens, frames, apart), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), batch_size):
                yield idx[s:s + batch_size], [reqs[i] for i in idx[s:s + batch_size]]

    # ---- running --------------------------------------------------------------------------------
    def _device_inputs(self, inputs) -> dict:
        dev, dtype = self.model.device, self.model.dtype
        return {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in inputs.items()}

    def _make_state(self, batch: Batch) -> RequestState | None:
        plan = batch.reqs[0].plan
        if not plan:
            return None
        state = RequestState(batch_size=len(batch.reqs), owner=[torch.arange(n) for n in batch.n_visual],
                             llm_depth=self.adapter.text_config.num_hidden_layers, mask_rules=self.adapter,
                             own_masks=self.adapter.own_masks, rope_layout=self.adapter.rope_layout)
        counts = [r.plan.keep_counts(n, max(len(r.images), 1), batch.n_video(b))
                  for b, (r, n) in enumerate(zip(batch.reqs, batch.n_visual))]
        for i, stage in enumerate(plan.stages):
            keep = [c[i] for c in counts]
            if stage.where == "vision":
                keep = [keep[b] for b, ims in enumerate(batch.images_of) for _ in ims]
            pruner = get_pruner(stage.pruner)
            run = StageRun(index=i, stage=stage, pruner=pruner, keep=keep, tower_layers=tower_layers(self.adapter, stage, pruner))
            for layer in run.tower_layers:
                state.tower_wants.setdefault(layer, set()).update(tower_records(pruner))
            if stage.where == "vision":
                last = vision_layer(self.adapter, stage)
                run.steps = pruner.vision_steps(last, stage.options) if pruner.progressive else [last]
                state.vision_stages.update({layer: run for layer in run.steps})
            elif stage.where == "llm":  # several steps (FrameFusion): the same run before each of its layers
                run.steps = pruner.llm_steps(stage.layer, stage.options)
                state.llm_stages.update({layer: run for layer in run.steps})
                if reads(pruner, "llm.normed"):
                    state.final_norm = self.adapter.llm_norm
            else:  # frames and pre_llm stages, in plan order
                state.pre_llm_stages.append(run)
        if state.tower_wants:
            prefix = self.adapter.vision_prefix
            state.tower = TowerRecord(prefix=prefix if prefix is not None else int(self.adapter.cls_tower))
            state.vision_layer_of = {id(m): j for j, m in enumerate(self.adapter.tower_attention_modules())}
        return state

    def _prefill(self, batch: Batch):
        """Tower, pruning stages, rebuilt LLM inputs and prefill -> (logits [B, V], attn, pos, cache, state, n_text)."""
        inputs = self._device_inputs(batch.inputs)
        state = self._make_state(batch)
        stack = self.adapter.new_deepstack()  # features added after the first LLM layers (None: not this family)
        feats, alive = self._encode(batch, inputs, state, stack)
        feats, alive = run_pre_llm_stages(self, batch, inputs, feats, alive, state)
        embeds, attn, pos, n_text = self._llm_inputs(batch, inputs, feats, alive, state)
        cache = cache_kwargs(self.model, DynamicCache(config=self.adapter.text_config))
        forward = {**cache, **self._forward_inputs(inputs, state)}
        if stack is not None:
            forward.update(stack.forward_kwargs(batch, inputs["input_ids"], self.adapter.visual_token_ids))
        return prefill(self.model, embeds, attn, pos, forward, state), attn, pos, cache, state, n_text

    def _forward_inputs(self, inputs, state) -> dict:
        """The family's extra prefill inputs (``Adapter.forward_inputs``), gathered to the tokens that enter the LLM."""
        extra = self.adapter.forward_inputs(inputs)
        if state is None:
            return extra
        return {k: v.gather(1, state.seq.to(v.device)) for k, v in extra.items()}

    @torch.inference_mode()
    def _run(self, batch: Batch, options: DecodeOptions) -> list[Result]:
        t0 = time.perf_counter()
        logits, attn, pos, cache, state, n_text = self._prefill(batch)
        t1 = time.perf_counter()
        tokens, logits = self._decode(logits, attn, pos, cache, state, options, batch.reqs[0].max_new_tokens)
        t2 = time.perf_counter()
        scoring_s = sum(s.seconds for s in state.frame_scoring) if state is not None else 0.0  # reported apart
        return build_results(self, batch, state, tokens, logits, n_text, t1 - t0 - scoring_s, t2 - t1)

    def _encode(self, batch, inputs, state, stack=None):
        """Vision tower (+ vision stages). Returns per request its [N_b, D] features and alive original indices;
        ``stack``: a DeepStack the adapter's encoders fill."""
        n_img = sum(len(ims) for ims in batch.images_of)
        n_vid = sum(v is not None for v in batch.video_of)
        if n_img == 0 and n_vid == 0:
            return [None] * len(batch.reqs), [torch.zeros(0, dtype=torch.long) for _ in batch.reqs]
        kwargs = {STATE_KWARG: state} if state is not None and state.tower_wants else {}
        extra = {} if stack is None else {"stack": stack}
        if state is not None and state.vision_stages:
            patch_coords = self.adapter.vision_patch_coords(inputs)
            state.image_coords = patch_coords
            state.image_alive = [torch.arange(c.shape[0]) for c in patch_coords]
            for b, ims in enumerate(batch.images_of):
                for j, i in enumerate(ims):
                    state.image_owner.append(b)
                    state.image_offset.append(sum(patch_coords[k].shape[0] for k in ims[:j]))
            kwargs[STATE_KWARG] = state
        want_tower = state is not None and any(wants_tower_feats(r.pruner) for r in state.pre_llm_stages)
        per_image, per_tower = self.adapter.encode_images_and_tower(inputs, **kwargs, **extra) if want_tower and n_img \
            else (self.adapter.encode_images(inputs, **kwargs, **extra) if n_img else [], None)
        if state is not None and state.vision_stages:  # per-image budgets padded the tower batch: drop the padding
            per_image, per_tower = state.unpad_images(per_image), state.unpad_images(per_tower)
        per_video = self.video_features(inputs, state, kwargs, extra) if n_vid else []
        if want_tower:  # the projector's input per request (images only), for stages that merge before it
            state.tower_feats = [torch.cat([per_tower[i] for i in ims]) if per_tower is not None and ims
                                 and batch.video_of[b] is None else None for b, ims in enumerate(batch.images_of)]
        feats, alive = [], []
        for b, ims in enumerate(batch.images_of):
            if state is not None and state.vision_stages:  # images only (no native video): their surviving tokens
                feats.append(torch.cat([per_image[i] for i in ims]) if ims else None)
                alive.append(torch.cat([state.image_offset[i] + state.image_alive[i] for i in ims]))
            else:
                feats.append(assemble(per_image, per_video, batch, b))
                alive.append(torch.arange(batch.n_visual[b]))
        return feats, alive

    def video_features(self, inputs, state, kwargs, extra) -> list[torch.Tensor]:
        """``encode_videos`` (``extra``: the family's own per-call inputs, Qwen3-VL's DeepStack); where the stages
        record tower signals, the video pass records into ``state.video_tower`` (the images' record stays in
        ``state.tower``)."""
        if not kwargs or state.tower is None:
            return self.adapter.encode_videos(inputs, **extra)
        images, state.tower = state.tower, TowerRecord(prefix=state.tower.prefix)
        try:
            return self.adapter.encode_videos(inputs, **kwargs, **extra)
        finally:
            state.video_tower, state.tower = state.tower, images

    def _llm_inputs(self, batch, inputs, feats, alive, state):
        """Embed, place the surviving visual features, drop pruned slots, left-pad again.

        Returns embeds [B, S, D], attention mask [B, S], position ids [..., B, S] (original
        positions, gathered; with ``positions=contiguous`` 0..L-1 over each request's kept sequence) and the
        number of text tokens per request.
        """
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = self.adapter.embed(ids)
        pos = self.adapter.position_ids(inputs)
        vis = torch.isin(ids, torch.tensor(self.adapter.visual_token_ids, device=ids.device))
        keep_slots, n_text = [], []
        vis_orig = torch.full_like(ids, -1)
        for b in range(ids.shape[0]):
            slots = vis[b].nonzero().flatten()
            if feats[b] is not None:
                embeds[b, slots[alive[b].to(slots.device)]] = feats[b].to(embeds.dtype)
            vis_orig[b, slots] = torch.arange(slots.numel(), device=ids.device)
            dropped = torch.ones_like(vis[b])
            dropped[slots[alive[b].to(slots.device)]] = False
            keep_slots.append((mask[b].bool() & (~vis[b] | ~dropped)).nonzero().flatten())
            n_text.append(int((mask[b].bool() & ~vis[b]).sum()))
        if state is None:  # nothing pruned before the LLM: the batch as the processor made it
            return embeds, mask, pos, n_text
        index, valid = left_pad_index(keep_slots, ids.device)
        embeds = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        pos = pos.gather(-1, index.expand(*pos.shape[:-2], *index.shape))
        if contiguous_positions(self.adapter, batch.reqs[0].plan):  # 1-D positions (M-RoPE families refuse it)
            pos = renumbered(valid).to(pos.dtype)
        state.seq, state.valid = index, valid
        state.slot_groups = self.adapter.attention_groups(inputs)
        state.vis_orig = torch.where(valid, vis_orig.gather(1, index), -1)
        state.coords = batch.coords
        state.frames = [f if batch.n_video(b) else None for b, f in enumerate(batch.frames)]
        state.next_slot = ids.shape[1]
        return embeds, valid.long(), pos, n_text

    def _decode(self, logits, attn, pos, cache, state, options, max_new_tokens):
        """-> tokens [B, T] (pad after each request's EOS), logits [B, T, V] (with output_logits) or None."""
        out, all_logits = [], []
        for token, step_logits in self._decode_steps(logits, attn, pos, cache, state, options, max_new_tokens):
            out.append(token)
            if options.output_logits:
                all_logits.append(step_logits.cpu())
        return torch.stack(out, dim=1), (torch.stack(all_logits, dim=1) if all_logits else None)

    def _decode_steps(self, logits, attn, pos, cache, state, options, max_new_tokens):
        """Yield (token [B], the logits it was sampled from [B, V]) step by step until every request ended."""
        gen = torch.Generator().manual_seed(options.seed) if options.do_sample else None
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=logits.device)
        pos = pos[..., -1:]
        for step in range(max_new_tokens):
            token = sample(logits, options, gen)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            yield token, logits
            finished |= torch.isin(token, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
            pos = next_positions(pos)
            logits = decode_one_token(self.model, self.adapter.embed, token, attn, pos, cache, state)
