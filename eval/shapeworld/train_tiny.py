"""Train a tiny VLM (LLaVA-1.5 or Qwen2-VL architecture) on the synthetic shape world (CPU friendly).

    python -m tokensieve.eval.shapeworld.train_tiny --family llava --out runs/tiny-llava
    python -m tokensieve.eval.shapeworld.train_tiny --family qwen2_vl --out runs/tiny-qwen2-vl

The result is a standard transformers checkpoint (weights, config, word-level tokenizer with a chat
template, processor), loadable with ``from_pretrained`` and ``tokensieve.load``. Scenes and videos
are rendered on the fly from ``--seed``; the held-out split uses another seed. Every example goes
through the model's own processor and chat template, exactly as the engine builds its prompts
(a video is 8 frames, one image placeholder each).

Besides the answer's cross-entropy: a linear head on the LLM's visual tokens predicts what each
token's cell shows (colour, shape, object centre: ``world.cell_labels``; and the token's row and
column), which trains the tower and keeps each visual token about its own cell (the head is not
saved); a grounding loss pulls the answer-predicting token's attention (LM layer 2) onto the
tokens of the objects the question is about (``QA.refs``); and a readout loss asks a linear reader
(not saved) to tell that object's colour, shape and half-plane from the answer-predicting token
right after layer 2, so what the attention found reaches the answer (the targets and losses are
in ``objectives``). ``--visual-share-weight`` also ranks the question's objects first among the visual
tokens in layer 1's attention (what FastV reads before layer 2). The data can be widened towards what
users bring: objects anywhere (``--free-fraction``), lossy media (``--lossy-fraction``, ``lossy``) and typed
questions (``--typed-fraction``). ``--init-from`` continues from a saved checkpoint. The options and their
checks are in ``train_options``; docs/training.md has the measurements.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import time

import torch

from ...engine.vocabulary import TRAINED_WORDS
from ...testing import make_tokenizer
from . import lossy, native_video, phrasing, tiny_models, train_options, world
from .objectives import (LETTERS, N_CLASSES, N_NAMED, N_READOUT, TargetOptions, aux_logits, aux_loss, cell_targets,
                         grounding_loss, grounding_targets, letter_loss, novelty_loss, position_loss, position_targets,
                         query_loss, readout_loss, share_loss, visual_share_loss, word_loss)
from .tower_phase import tower_accuracy, tower_step
from .video_targets import frame_targets, look_targets, novelty_targets
from .tiny_models import GRID, IMAGE, VIDEO_FRAMES


def vocabulary(seed: int = 0, n: int = 3000) -> list[str]:
    """Every word the world's questions and answers use (collected from generated samples)."""
    rng, words = random.Random(seed), set()
    for _ in range(n):
        scene = world.random_scene(rng, size=IMAGE)
        for qa in world.image_questions(scene, rng):
            qa = world.multiple_choice(qa, rng) if rng.random() < 0.3 else qa
            words.update(qa.question.split() + [qa.answer])
    for _ in range(n // 10):
        video = world.random_video(rng, n_frames=VIDEO_FRAMES, size=IMAGE)
        for qa in world.video_questions(video, rng):
            qa = world.multiple_choice(qa, rng) if rng.random() < 0.3 else qa
            words.update(qa.question.split() + [qa.answer])
    return sorted(words)


def write_trained_words(out: str) -> None:
    """``trained_words.json`` in a checkpoint: the words of the world's questions, and the typed variants the
    tokenizer's normaliser reads (phrasing.VARIANT_WORDS); the engine reports any other word of a question
    as not understood (tokensieve.engine.vocabulary)."""
    words = {w for w in vocabulary() if re.fullmatch(r"[a-z][a-z'-]*", w)} | set(phrasing.VARIANT_WORDS)
    with open(os.path.join(out, TRAINED_WORDS), "w") as f:
        json.dump({"words": sorted(words), "source": "the shape world's questions (tokensieve.eval.shapeworld)"}, f,
                  indent=0)
        f.write("\n")


IMAGE_TYPES = ("colour", "shape", "exist", "count", "position")  # the curriculum's order
VIDEO_TYPES = ("appeared", "ever", "order", "distinct")


def unlocked(types: tuple[str, ...], step: int, every: int) -> tuple[str, ...]:
    """The question types a curriculum opening one type every ``every`` steps allows at ``step``."""
    return types if every <= 0 else types[: 1 + step // every]


def sample_examples(rng: random.Random, n: int, video: bool, turns: int = 1, mc_fraction: float = 0.2,
                    types: tuple[str, ...] | None = None, layout: str = "lattice",
                    free_fraction: float = 0.0, typed_fraction: float = 0.0) -> list[dict]:
    """``n`` examples: {"scenes": [Scene per image/frame], "qas": [QA, ...] (up to ``turns``, of ``types``)};
    ``layout``: where objects sit (``world.random_scene`` / ``random_video``: "lattice" or "free");
    ``free_fraction``: the share of image scenes drawn with ``layout="free"`` instead (0: no draw is made;
    videos keep ``layout``);
    ``typed_fraction``: the share of open questions written the ways people type them (``phrasing.rephrase``;
    0: no draw is made)."""
    out = []
    while len(out) < n:
        if video:
            v = world.random_video(rng, n_frames=VIDEO_FRAMES, size=IMAGE, layout=layout)
            scenes, qas = v.frames, world.video_questions(v, rng)
        else:
            free = free_fraction > 0 and rng.random() < free_fraction
            scene = world.random_scene(rng, size=IMAGE, layout="free" if free else layout)
            scenes, qas = [scene], world.image_questions(scene, rng)
        qas = [qa for qa in qas if types is None or qa.type in types]
        if not qas:
            continue
        qas = rng.sample(qas, min(turns, len(qas)))
        qas = [world.multiple_choice(qa, rng) if rng.random() < mc_fraction else qa for qa in qas]
        qas = [phrasing.maybe_typed(qa, rng, typed_fraction) for qa in qas]
        out.append({"scenes": scenes, "qas": qas})
    return out


def collate(proc, examples: list[dict], eos_id: int, targets: bool = True,
            options: TargetOptions = TargetOptions(), media=None, native: bool = False) -> dict:
    """Processor inputs for a conversation (one turn per QA, the first turn exactly the engine's
    prompt); ``labels`` keep each answer and the eos after it; with ``targets``, ``cells``
    [n_images, GRID * GRID, len(TARGETS)] (the per-token targets), ``ground`` (grounding_targets) and
    ``novelty`` [B, L] (novelty_targets), ``frames`` (frame_targets) and ``look`` (look_targets).
    ``media(frames) -> frames``: what an example's rendered images pass through first (``lossy``: a codec).
    ``native``: every example is a video entering as one native video (``native_video``; Qwen2-VL), whose
    targets are those of its temporal patches (``native_video.temporal_groups``)."""
    texts, images, frames = [], [], []
    if native:
        examples = [dict(ex, frames=ex["scenes"], scenes=native_video.temporal_groups(ex["scenes"])) for ex in examples]
    for ex in examples:
        messages = []
        visual = [{"type": "video"}] if native else [{"type": "image"}] * len(ex["scenes"])
        for i, qa in enumerate(ex["qas"]):
            content = (visual if i == 0 else []) + [{"type": "text", "text": qa.question}]
            messages += [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": qa.answer}]}]
        texts.append(proc.apply_chat_template(messages, tokenize=False).rstrip())
        rendered = [world.render(s) for s in ex.get("frames", ex["scenes"])]
        images.append(rendered if media is None else media(rendered))
        frames += ex["scenes"]
    visuals = native_video.video_kwargs(proc, images) if native else {"images": images}
    batch = dict(proc(text=texts, return_tensors="pt", padding=True, **visuals))
    ids = batch["input_ids"]
    marker = proc.tokenizer.convert_tokens_to_ids(assistant_marker(proc))
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, 1:] = ids[:, :-1] == marker  # the answer word follows the assistant marker
    is_eos = torch.zeros_like(answer)
    is_eos[:, 1:] = answer[:, :-1] & (ids[:, 1:] == eos_id)
    batch["labels"] = torch.where(answer | is_eos, ids, -100)
    if targets:
        batch["cells"] = cell_targets(frames)
        batch["ground"] = grounding_targets(proc, examples, ids, marker, options)
        batch["novelty"] = novelty_targets(proc, examples, ids, options.novelty_centres)
        batch["positions"] = position_targets(proc, examples, ids)
        batch["frames"] = frame_targets(proc, examples, ids)
        batch["look"] = look_targets(proc, examples, ids, options.novelty_centres)
    return batch


FRAME_COUNT_LAYER = 3  # the LM layer where a distinct answer spreads its attention over the frames (--frame-weight)
TARGET_KEYS = ("cells", "ground", "novelty", "positions", "frames", "look")  # what collate adds with targets


def assistant_marker(proc) -> str:
    """The last word of the generation prompt (``ASSISTANT:`` / ``assistant``): answers follow it."""
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                                      add_generation_prompt=True, tokenize=False)
    return prompt.split()[-1]


def train_step(model, head, capture: list, batch: dict, aux_weight: float, ground_weight: float = 0.0,
               reader=None, readout_weight: float = 0.0, option_weight: float = 0.0, letter_reader=None,
               letter_weight: float = 0.0, novelty_reader=None, novelty_weight: float = 0.0,
               share_weight: float = 0.0, readout_layers: tuple[int, ...] = (2,), ground_per_head: bool = False,
               query_reader=None, query_weight: float = 0.0, position_reader=None, position_weight: float = 0.0,
               word_weight: float = 0.0, frame_reader=None, frame_weight: float = 0.0, look_weight: float = 0.0,
               look_layer: int = 1, look_heads: tuple[int, ...] | None = None, count_after_frames: bool = False,
               visual_share_weight: float = 0.0, visual_share_layer: int = 1, visual_ids: tuple[int, ...] = ()
               ) -> tuple[torch.Tensor, dict]:
    capture.clear()
    cells, g, novelty, positions = batch.pop("cells"), batch.pop("ground"), batch.pop("novelty"), batch.pop("positions")
    frames, look = batch.pop("frames", None), batch.pop("look", None)
    novel = novelty_weight > 0 and bool((novelty >= 0).any())
    framed = frame_weight > 0 and frames is not None
    looked = look_weight > 0 and look is not None
    out = model(**batch, output_attentions=framed or looked or g is not None and (
                    ground_weight > 0 or option_weight > 0 or share_weight > 0 or word_weight > 0 or visual_share_weight > 0),
                output_hidden_states=novel or framed or position_weight > 0 or (
                    g is not None and (readout_weight > 0 or letter_weight > 0 or query_weight > 0)))
    loss, info = out.loss, {"lm": out.loss.item()}
    if g is not None and ground_weight and g.grounded.any():
        sel = g.grounded
        term = grounding_loss(out.attentions, g.rows[sel], g.pos[sel], g.mask[sel], per_head=ground_per_head)
        loss, info["ground"] = loss + ground_weight * term, term.item()
    if g is not None and visual_share_weight and g.grounded.any():  # what FastV ranks before the next layer
        sel = g.grounded
        visual = torch.isin(batch["input_ids"][g.rows[sel]], torch.tensor(visual_ids))  # [T, L] image or video tokens
        term = visual_share_loss(out.attentions, g.rows[sel], g.pos[sel], g.mask[sel], visual, visual_share_layer)
        loss, info["visual_share"] = loss + visual_share_weight * term, term.item()
    if g is not None and option_weight and g.option.any():
        sel = g.option.any(-1)
        term = grounding_loss(out.attentions, g.rows[sel], g.pos[sel], g.option[sel], layer=len(out.attentions) - 1)
        loss, info["option"] = loss + option_weight * term, term.item()
    if g is not None and share_weight and g.share.any():
        sel = g.share.any(-1)
        term = share_loss(out.attentions, g.rows[sel], g.pos[sel], g.share[sel])
        loss, info["share"] = loss + share_weight * term, term.item()
    if g is not None and readout_weight and (g.attrs >= 0).any():
        before = g.attrs  # with count_after_frames: no count of a frame-counted answer before layer 3
        if count_after_frames:
            before = g.attrs.clone()
            before[g.frames.any(-1), -1] = -100
        term = sum(readout_loss(reader, out.hidden_states, g.rows, g.pos,
                                g.attrs if layer >= FRAME_COUNT_LAYER else before, layer) for layer in readout_layers)
        loss, info["readout"] = loss + readout_weight * term, term.item()
    if g is not None and word_weight and g.words.any():
        sel = g.words.any(-1)
        term = word_loss(out.attentions, g.rows[sel], g.pos[sel], g.words[sel])
        loss, info["word"] = loss + word_weight * term, term.item()
    if g is not None and query_weight and (g.named >= 0).any():
        term = query_loss(query_reader, out.hidden_states, g.rows, g.pos, g.named)
        loss, info["query"] = loss + query_weight * term, term.item()
    if g is not None and letter_weight and (g.letters >= 0).any():
        term = letter_loss(letter_reader, out.hidden_states, g.rows, g.letters)
        loss, info["letter"] = loss + letter_weight * term, term.item()
    if novel:
        term = novelty_loss(novelty_reader, out.hidden_states, novelty)
        loss, info["novelty"] = loss + novelty_weight * term, term.item()
    if framed:  # each frame's last token looks at its new object and tells "new"; a distinct answer counts them
        seek = share_loss(out.attentions, frames.rows, frames.pos, frames.share, layer=2)
        new = novelty_loss(frame_reader, out.hidden_states, frame_new_map(frames, novelty.shape), layer=2)
        loss, info["frame_look"], info["frame_new"] = loss + frame_weight * (seek + new), seek.item(), new.item()
        if g is not None and g.frames.any():
            sel = g.frames.any(-1)
            term = share_loss(out.attentions, g.rows[sel], g.pos[sel], g.frames[sel], layer=FRAME_COUNT_LAYER)
            loss, info["frame_count"] = loss + frame_weight * term, term.item()
    if looked:  # each video object token looks back at its object's last earlier frame, or at the sink if new
        term = share_loss(out.attentions, look.rows, look.pos, look.share, layer=look_layer, heads=look_heads)
        loss, info["look"] = loss + look_weight * term, term.item()
    if position_weight:
        term = position_loss(position_reader, out.hidden_states, positions)
        loss, info["position"] = loss + position_weight * term, term.item()
    if aux_weight:  # (a frozen tower: the per-token head has nothing to train)
        aux = aux_loss(aux_logits(head, capture[0], cells.shape[0]), cells)
        loss, info["aux"] = loss + aux_weight * aux, aux.item()
    return loss, info


def frame_new_map(frames, shape) -> torch.Tensor:
    """[B, L] long: ``frames.new`` at each frame's last token, -100 elsewhere (novelty_loss's format)."""
    out = torch.full(shape, -100, dtype=torch.long)
    out[frames.rows, frames.pos] = frames.new
    return out


@torch.no_grad()
def evaluate(model, proc, eos_id: int, n: int, seed: int, video: bool, batch: int = 32, native: bool = False) -> dict:
    """Greedy accuracy of the answer word per question type (and over open / multiple-choice questions)
    on held-out single-question examples (another seed), in exactly the engine's prompt format."""
    right, total = tally(model, proc, eos_id, n, seed, video, batch, native=native)
    return {k: round(right[k] / total[k], 4) for k in sorted(total)}


@torch.no_grad()
def relevance_examples(rng: random.Random, n: int) -> list[dict]:
    """``n`` single frames of world videos, each asked QuoTA's per-frame question about an object of its video
    ("is there a red circle ?", type "relevance"): half about an object the frame shows (yes), a quarter about
    one the video shows in other frames only (no), a quarter about one it never shows (no)."""
    out = []
    while len(out) < n:
        video = world.random_video(rng, n_frames=VIDEO_FRAMES, size=IMAGE)
        frame = rng.choice(video.frames)
        shown = {o.name for o in frame.objects}
        elsewhere = sorted({o.name for o in video.meta["objects"].values()} - shown)
        draw = rng.random()
        if draw < 0.5 and shown:
            name, answer = rng.choice(sorted(shown)), "yes"
        elif draw < 0.75 and elsewhere:
            name, answer = rng.choice(elsewhere), "no"
        else:
            name, answer = world.absent_name(list(video.meta["objects"].values()), rng), "no"
        out.append({"scenes": [frame], "qas": [world.QA(f"is there a {name} ?", answer, "relevance")]})
    return out


def tally(model, proc, eos_id: int, n: int, seed: int, video: bool, batch: int = 32,
          progress=None, typed: bool = False, sampler=None, layout: str = "lattice", media=None,
          native: bool = False) -> tuple[dict, dict]:
    """``evaluate``'s counts: (right, total) per key ("all", each type, "open" / "multiple-choice");
    ``progress(k)`` after each batch of k examples. ``typed``: open questions only, each rewritten the
    way a person types it (``phrasing.rephrase``: capitals, "color", "What is the colour of ...?").
    ``sampler(rng, k)``: the examples to ask instead of ``sample_examples`` (e.g. ``relevance_examples``).
    ``media``: what each example's rendered images pass through (``collate``; e.g. a codec from ``lossy``).
    ``native``: videos enter as native videos (``collate``), as the engine's default ``video_mode`` gives Qwen2-VL."""
    was_training = model.training
    model.eval()
    rng, typing = random.Random(seed), random.Random(seed + 1)
    right, total = {}, {}
    for start in range(0, n, batch):
        k = min(batch, n - start)
        examples = sampler(rng, k) if sampler is not None else \
            sample_examples(rng, k, video, layout=layout, **({"mc_fraction": 0.0} if typed else {}))
        if typed:
            examples = [dict(ex, qas=[dataclasses.replace(qa, question=phrasing.rephrase(qa.question, typing))
                                      for qa in ex["qas"]]) for ex in examples]
        b = collate(proc, examples, eos_id, targets=False, media=media, native=native and video)
        gold = b.pop("labels")[:, -2]
        pred = model(**b).logits[:, -3].argmax(-1)
        for p, g, ex in zip(pred.tolist(), gold.tolist(), examples):
            for key in ("all", ex["qas"][0].type, "multiple-choice" if ex["qas"][0].options else "open"):
                right[key] = right.get(key, 0) + int(p == g)
                total[key] = total.get(key, 0) + 1
        if progress is not None:
            progress(len(examples))
    model.train(was_training)
    return right, total


def load_weights(model, path: str, keep: set[int] | None = None) -> None:
    """Copy parameters from the checkpoint at ``path``: every one, or with ``keep`` (ids of parameters
    left as they are: the language model for ``--tower-from``) every other one."""
    saved = dict(type(model).from_pretrained(path).named_parameters())
    wanted = {n: p for n, p in model.named_parameters() if keep is None or id(p) not in keep}
    missing = [n for n, p in wanted.items() if n not in saved or saved[n].shape != p.shape]
    if missing:
        raise SystemExit(f"{path}: no {missing[0]} (and {len(missing) - 1} more) of this shape in it")
    with torch.no_grad():
        for n, p in wanted.items():
            p.copy_(saved[n])


def main(argv=None):
    args = train_options.parse(argv, __doc__)
    last = args.stop_at or args.steps
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = make_tokenizer(tuple(vocabulary()))
    extra = {} if args.width_rope_scale is None else {"width_rope_scale": args.width_rope_scale}
    model, proc = tiny_models.BUILDERS[args.family](tok, **extra)
    if args.native_fraction:
        native_video.check_family(proc, "--native-fraction")
    if args.typed_fraction:  # the normaliser the saved tokenizer gets (phrasing.install), on while training
        tok.backend_tokenizer.normalizer = phrasing.normalizer(tok.get_vocab())
    if (args.ground_weight or args.option_weight or args.word_weight or args.frame_weight or args.look_weight
            or args.visual_share_weight):  # (read attention probabilities)
        model.set_attn_implementation("eager")
    eos_id = model.config.get_text_config().eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = eos_id
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, sum(N_CLASSES))
    if args.embed_std:
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=args.embed_std)
    capture: list = []
    tiny_models.visual_tokens(model).register_forward_hook(lambda mod, inp, out: capture.append(out))
    reader = torch.nn.Linear(model.config.get_text_config().hidden_size, sum(N_READOUT))
    lm = set(map(id, model.get_decoder().parameters())) | set(map(id, model.get_output_embeddings().parameters()))
    letter_reader = torch.nn.Linear(model.config.get_text_config().hidden_size, len(LETTERS))
    novelty_reader = torch.nn.Linear(model.config.get_text_config().hidden_size, 2)
    query_reader = torch.nn.Linear(model.config.get_text_config().hidden_size, sum(N_NAMED))
    position_reader = torch.nn.Linear(model.config.get_text_config().hidden_size, 2 * GRID)
    frame_reader = torch.nn.Linear(model.config.get_text_config().hidden_size, 2)
    readers = [*reader.parameters(), *letter_reader.parameters(), *novelty_reader.parameters(),
               *query_reader.parameters(), *position_reader.parameters(), *frame_reader.parameters()]
    lm |= set(map(id, readers))  # train with the LM
    if args.tower_from or args.init_from:
        load_weights(model, args.init_from or args.tower_from, None if args.init_from else lm)
        args.tower_steps = 0
    params = [*model.parameters(), *head.parameters(), *readers]
    own = set(map(id, readers)) if args.reader_lr else set()  # readers with their own learning rate
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in lm], "lr": args.lr},
                             {"params": [p for p in params if id(p) in lm - own], "lr": args.lm_lr or args.lr},
                             {"params": [p for p in params if id(p) in own], "lr": args.reader_lr or args.lr}],
                            weight_decay=0.01)
    warm = max(1, args.steps // 20 if args.warmup is None else args.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "train_log.jsonl"), "a")
    t0 = time.time()
    model.train()
    if args.tower_steps:
        tower = [p for p in params if id(p) not in lm]
        tower_opt = torch.optim.AdamW(tower, lr=args.lr, weight_decay=0.01)
        for step in range(1, args.tower_steps + 1):
            loss = tower_step(model, proc, head, capture, rng, 64, args.free_fraction, args.native_fraction)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tower, 1.0)
            tower_opt.step()
            tower_opt.zero_grad()
            if step % 50 == 0:
                print(f"tower step {step} aux {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
            if step % args.eval_every == 0 or step == args.tower_steps:
                acc = tower_accuracy(model, proc, head, capture, 30_000 + args.seed)
                native = {"object_cells_native": tower_accuracy(model, proc, head, capture, 30_000 + args.seed,
                                                                native=True)} if args.native_fraction else {}
                log.write(json.dumps({"tower_step": step, "aux": loss.item(), "object_cells": acc, **native,
                                      "s": round(time.time() - t0)}) + "\n")
                log.flush()
                print(f"tower step {step} held-out object cells {acc}", flush=True)
    if args.freeze_tower:
        projector = set(map(id, tiny_models.visual_tokens(model).parameters())) if args.train_projector else set()
        for p in params:
            if id(p) not in lm | projector:
                p.requires_grad_(False)
        args.aux_weight = 0.0
    target_options = TargetOptions(args.count_readout, args.distinct_readout, args.order_first,
                                   args.novelty_centres, args.distinct_sink, args.count_sink, args.frame_weight > 0)
    media_rng = random.Random(args.seed + 1)  # its own stream: the scenes drawn do not depend on --lossy-fraction
    media = (lambda frames: lossy.degrade(frames, media_rng) if media_rng.random() < args.lossy_fraction else frames) \
        if args.lossy_fraction else None
    native_rng = random.Random(args.seed + 2)  # (which video batches enter natively: no draw at 0)
    visual_ids = tuple(proc.tokenizer.convert_tokens_to_ids(t) for t in (proc.image_token, getattr(proc, "video_token", None))
                       if t is not None)
    for step in range(1, last + 1):
        img_types = unlocked(IMAGE_TYPES, step, args.curriculum)
        vid_types = unlocked(VIDEO_TYPES, step - args.video_from, args.curriculum)
        mc = args.mc_fraction if img_types == IMAGE_TYPES else 0.0
        parts = [sample_examples(rng, args.batch, False, args.turns, mc, img_types, free_fraction=args.free_fraction,
                                 typed_fraction=args.typed_fraction)]
        if args.video_batch and step >= args.video_from:
            parts.append(sample_examples(rng, args.video_batch, True, args.turns, mc, vid_types,
                                         typed_fraction=args.typed_fraction))
        native = len(parts) > 1 and args.native_fraction > 0 and native_rng.random() < args.native_fraction
        info = {}
        for kind, examples in zip(("", "native_" if native else "video_"), parts):
            batch = collate(proc, examples, eos_id, options=target_options, media=media, native=kind == "native_")
            loss, part = train_step(
                model, head, capture, batch, args.aux_weight, args.ground_weight, reader=reader,
                readout_weight=args.readout_weight, option_weight=args.option_weight, letter_reader=letter_reader,
                letter_weight=args.letter_weight, novelty_reader=novelty_reader, novelty_weight=args.novelty_weight,
                share_weight=args.ground_weight, readout_layers=tuple(args.readout_layers),
                ground_per_head=args.ground_per_head, query_reader=query_reader, query_weight=args.query_weight,
                position_reader=position_reader, position_weight=args.position_weight, word_weight=args.word_weight,
                frame_reader=frame_reader, frame_weight=args.frame_weight, look_weight=args.look_weight,
                look_layer=args.look_layer, look_heads=tuple(args.look_heads),
                count_after_frames=args.count_after_frames, visual_share_weight=args.visual_share_weight,
                visual_share_layer=args.visual_share_layer, visual_ids=visual_ids)
            (loss * len(examples) / sum(map(len, parts))).backward()
            info.update({kind + k: v for k, v in part.items()})
        if args.clip:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.requires_grad], args.clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 25 == 0:
            print(f"step {step} " + " ".join(f"{k} {v:.3f}" for k, v in info.items()) + f" {time.time() - t0:.0f}s",
                  flush=True)
        if step % args.eval_every == 0 or step == last:
            acc = {"image": evaluate(model, proc, eos_id, args.eval_n, 10_000 + args.seed, video=False)}
            if args.video_batch:
                acc["video"] = evaluate(model, proc, eos_id, args.eval_n // 2, 20_000 + args.seed, video=True, batch=8)
            if args.video_batch and args.native_fraction:
                acc["video_native"] = evaluate(model, proc, eos_id, args.eval_n // 2, 20_000 + args.seed, video=True,
                                               batch=8, native=True)
            log.write(json.dumps({"step": step, **info, "held_out": acc, "s": round(time.time() - t0)}) + "\n")
            log.flush()
            print(f"step {step} held-out {acc}", flush=True)
        if step % args.save_every == 0 or step == last:
            model.save_pretrained(args.out)
            proc.save_pretrained(args.out)
            phrasing.install(os.path.join(args.out, "tokenizer.json"))  # questions as people type them
            write_trained_words(args.out)


if __name__ == "__main__":
    main()
