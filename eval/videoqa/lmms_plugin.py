"""The lmms-eval plugin (extra ``tokensieve[lmms]``): any lmms-eval task, on any supported model, under a plan.

    lmms-eval eval --model tokensieve \\
        --model_args model=llava-hf/llava-onevision-qwen2-7b-ov-hf,plan=dycoke:keep=0.25,nframes=32,dtype=bfloat16,device=cuda \\
        --tasks videomme,mvbench --batch_size 8 --output_path runs/lmms --log_samples

Registered through lmms-eval's ``lmms_eval.models`` entry-point group (setup.py) with the ModelManifest
``manifest()`` returns, so nothing of lmms-eval is patched. Model args: ``model`` (hub id or local directory;
default the embedded model), ``plan`` (a plan string in quotes, ``plan="fastv:layer=2,keep=0.25"``, as lmms-eval
splits model_args at commas outside quotes; an unquoted plan whose option names do not repeat is re-joined; or a
YAML/JSON plan file), ``nframes`` / ``fps`` (video sampling, qwen-vl-utils rules; default 8 frames),
``video_mode`` (native / frames), ``device``, ``dtype``, ``batch_size``, ``max_new_tokens`` (when a task gives
none). A task's visuals are PIL images (image tasks) or video file paths (video tasks: one per document).
Generation follows the task's ``generation_kwargs``: greedy unless ``do_sample`` with a positive temperature;
``until`` strings cut the answer; ``num_beams`` > 1 is refused. A document whose inputs cannot be used
(an unreadable video, ...) is answered "" and its error logged; the run goes on.
"""
from __future__ import annotations

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

import tokensieve

from ...engine.errors import InputError, TokenSieveError

MODEL_ID = "tokensieve"


def manifest():
    """The payload of the ``lmms_eval.models`` entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(MODEL_ID, simple_class_path=f"{__name__}.TokenSieve")


class TokenSieve(lmms):
    is_simple = True

    def __init__(self, model: str | None = None, plan: str | None = None, nframes: int | None = None,
                 fps: float | None = None, video_mode: str = "native", device: str = "cpu", dtype: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, max_new_tokens: int = 32, **plan_options):
        super().__init__()
        plan = plan.strip("'\"") if isinstance(plan, str) else plan  # plan="a:x=1,y=2" keeps its commas
        if plan_options:  # an unquoted plan=fastv:layer=2,keep=0.25 was split by lmms-eval at its commas
            if not plan:
                raise InputError(f"unknown model_args {sorted(plan_options)}; known: model, plan, nframes, fps, "
                                 "video_mode, device, dtype, batch_size, max_new_tokens")
            plan = ",".join([plan, *(f"{k}={v}" for k, v in plan_options.items())])
        if nframes is not None and fps is not None:
            raise InputError("give nframes or fps, not both")
        self.video_options = {**({"nframes": int(nframes)} if nframes is not None else {}),
                              **({"fps": float(fps)} if fps is not None else {})}
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self.engine = tokensieve.load(model or None, plan=plan or None, device=device, dtype=dtype,
                                      video_mode=video_mode, max_new_tokens=self.max_new_tokens)

    # ---- one document's inputs ----------------------------------------------------------------------
    def _media(self, visuals) -> dict:
        """A document's visuals -> {"images": [...]} or {"video": {...}} for the engine."""
        visuals = [v for v in (visuals or []) if v is not None]
        videos = [v for v in visuals if isinstance(v, str)]
        if not videos:
            return {"images": visuals}
        if len(videos) > 1 or len(visuals) > 1:
            raise InputError(f"a document with {len(videos)} video(s) and {len(visuals) - len(videos)} image(s); "
                             "tokensieve takes one video per request")
        return {"video": {"path": videos[0], **self.video_options}}

    def _visuals(self, doc_to_visual, doc_id, task, split):
        return doc_to_visual(self.task_dict[task][split][doc_id])

    @staticmethod
    def _generation(gen_kwargs: dict, default_max_new: int) -> tuple[dict, list[str]]:
        """lmms-eval generation_kwargs -> (engine options, stop strings)."""
        g = dict(gen_kwargs or {})
        until = g.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if int(g.get("num_beams", 1) or 1) > 1:
            raise InputError("num_beams > 1: tokensieve decodes greedily or by sampling")
        temperature = float(g.get("temperature", 0) or 0)
        options = {"max_new_tokens": int(g.get("max_new_tokens", default_max_new))}
        if g.get("do_sample") and temperature > 0:
            options.update(do_sample=True, temperature=temperature)
            if g.get("top_p") is not None:
                options["top_p"] = float(g["top_p"])
        return options, until

    @staticmethod
    def _cut(text: str, until: list[str]) -> str:
        for stop in until:
            if stop and stop in text:
                text = text[:text.index(stop)]
        return text

    def _answer(self, requests: list[dict], options: dict) -> list[str]:
        """Engine answers for requests sharing options: one padded-batch call; on a bad input, one at a time
        so the others still run (the bad one answers "")."""
        sampling = {k: v for k, v in options.items() if k != "max_new_tokens"}
        reqs = [dict(r, max_new_tokens=options["max_new_tokens"]) for r in requests]
        try:
            return [r.text for r in self.engine.generate_batch(reqs, batch_size=self.batch_size, **sampling)]
        except TokenSieveError:
            out = []
            for r in reqs:
                try:
                    out.append(self.engine.generate_batch([r], **sampling)[0].text)
                except TokenSieveError as e:
                    logger.error(f"tokensieve: {e}")
                    out.append("")
            return out

    # ---- lmms-eval's three request types ---------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batched: documents sharing generation settings run as padded batches of ``batch_size``."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted((req.args[1] or {}).items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="tokensieve", disable=self.rank != 0)
        for idx in groups.values():
            options, until = self._generation(requests[idx[0]].args[1], self.max_new_tokens)
            for start in range(0, len(idx), self.batch_size):
                part = idx[start:start + self.batch_size]
                reqs, ok = [], []
                for i in part:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    try:
                        reqs.append({"prompt": context, **self._media(self._visuals(doc_to_visual, doc_id, task, split))})
                        ok.append(i)
                    except TokenSieveError as e:
                        logger.error(f"tokensieve: {task} document {doc_id}: {e}")
                        out[i] = ""
                for i, text in zip(ok, self._answer(reqs, options) if reqs else []):
                    out[i] = self._cut(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], out[i])
                bar.update(len(part))
        bar.close()
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(log P(continuation | context, visuals), greedy) per request, under the plan (as a GenerationResult's text)."""
        out = []
        for req in tqdm(requests, desc="tokensieve loglikelihood", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            media = self._media(doc_to_visual(doc))
            # wrapped: lmms-eval 0.7.3's evaluator (unwrap_generation_output) turns a bare (float, bool) into its
            # str(), which its multiple_choice scoring cannot unpack; a GenerationResult is passed through as is
            out.append(GenerationResult(self.engine.loglikelihood(context, continuation, **media)))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Round by round per document: round 0 asks the task's context; each later round's visuals and
        context come from the task's ``doc_to_text(doc, previous_output, round_idx, previous_round_info)``
        until it signals the end. Returns each document's answers, one per round."""
        out = []
        for req in tqdm(requests, desc="tokensieve multi-round", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            options, until = self._generation(gen_kwargs, self.max_new_tokens)
            doc = self.task_dict[task][split][doc_id]
            visuals, answers, info = doc_to_visual(doc), [], None
            for round_idx in range(1000):
                if round_idx:
                    visuals, context, done, answers, info = doc_to_text(
                        doc, previous_output=answers, round_idx=round_idx, previous_round_info=info)
                    answers = list(answers)
                    if done:
                        break
                try:
                    request = {"prompt": context, **self._media(visuals)}
                except TokenSieveError as e:
                    logger.error(f"tokensieve: {task} document {doc_id}: {e}")
                    answers.append("")
                    break
                answers.append(self._cut(self._answer([request], options)[0], until))
            out.append(answers)
        return out

    def clean(self):
        self.engine.close()
        super().clean()
