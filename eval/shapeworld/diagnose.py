"""Where a trained tiny VLM goes wrong: the measurements behind docs/training.md's diagnosis.

    python -m tokensieve.eval.shapeworld.diagnose tiny-llava

On held-out image questions (seed 10 000, the report's), in the training script's prompt format:

- ``accuracy``: greedy accuracy per question type, open and multiple-choice questions apart;
- ``object_mass``: per question type and LM layer, the attention mass (mean of the heads) that the
  answer-predicting token puts on the visual tokens of the objects the question is about;
- ``left_right_probe``: held-out accuracy of a logistic probe reading "left or right" from the
  answer-predicting token's hidden state after each layer (0 = the embeddings), and the same probe
  reading each visual token's column at the LM input: is the object's place in the tokens, and does
  it reach the answer?

On held-out videos (seed 20 000), read as the engine reads the model's videos (``--video-mode default``:
native on Qwen2-VL, temporal patches of two frames; frames on LLaVA), for the "how many distinct objects
appeared ?" path:

- ``look_back``: per LM layer and head, the attention mass that each video object token puts on its
  look-back target (``video_targets.look_targets``: its object's tokens in the frame before, or the
  first token where the object is new), for seen and new tokens apart; and a logistic probe reading
  "new" from those tokens after each layer (videos of the first 70% fit it).
- ``distinct_count``: on open distinct questions, per true count, the accuracy and the answer token's
  frame-count-layer attention share on frames with a new object; probes of the count from that share
  and from the answer token after each layer: is the count lost in the attention or after it?
"""
from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

import torch

from . import native_video, shipped, train_tiny
from .tiny_models import GRID

SEED = 10_000
VIDEO_SEED = 20_000


def _batches(proc, eos_id: int, n: int, types=None, mc_fraction: float = 0.2, batch: int = 32, targets: bool = True):
    rng = random.Random(SEED)
    for start in range(0, n, batch):
        examples = train_tiny.sample_examples(rng, min(batch, n - start), False, 1, mc_fraction, types)
        yield examples, train_tiny.collate(proc, examples, eos_id, targets=targets)


def _model_inputs(batch: dict) -> dict:
    """Drop collate's targets and labels from ``batch`` (in place): what is left is the model's input."""
    for key in (*train_tiny.TARGET_KEYS, "labels"):
        batch.pop(key)
    return batch


@torch.no_grad()
def accuracy_and_mass(model, proc, eos_id: int, n: int) -> tuple[dict, dict]:
    right, mass = defaultdict(list), defaultdict(list)
    for examples, b in _batches(proc, eos_id, n):
        for unused in set(train_tiny.TARGET_KEYS) - {"ground"}:
            b.pop(unused)
        g = b.pop("ground")  # objectives.Grounding: the question's objects' visual tokens per turn
        gold = b.pop("labels")[:, -2]
        out = model(**b, output_attentions=True)
        pred = out.logits[:, -3].argmax(-1)
        for i, ex in enumerate(examples):
            qa = ex["qas"][0]
            right[f"{qa.type}/{'multiple-choice' if qa.options else 'open'}"].append(int(pred[i] == gold[i]))
        if g is not None:
            for r, p, m in zip(g.rows.tolist(), g.pos.tolist(), g.mask):
                if m.any():
                    layers = [(a[r, :, p] * m).sum(-1).mean().item() for a in out.attentions]
                    mass[examples[r]["qas"][0].type].append(layers)
    acc = {k: {"accuracy": round(sum(v) / len(v), 3), "n": len(v)} for k, v in sorted(right.items())}
    per_layer = {k: [round(sum(x[i] for x in v) / len(v), 3) for i in range(len(v[0]))] for k, v in sorted(mass.items())}
    return acc, per_layer


def _probe(x: torch.Tensor, y: torch.Tensor, classes: int, train: float = 0.7, steps: int = 300) -> float:
    """Held-out accuracy of an L2-regularised logistic probe (first ``train`` of the rows fit it)."""
    cut = int(len(y) * train)
    x = (x - x[:cut].mean(0)) / (x[:cut].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x[:cut] @ w + b, y[:cut]) + 1e-3 * (w ** 2).sum()
        opt.zero_grad(), loss.backward(), opt.step()
    return round(((x[cut:] @ w + b).argmax(-1) == y[cut:]).float().mean().item(), 3)


@torch.no_grad()
def left_right_probe(model, proc, eos_id: int, n: int) -> dict:
    image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    hidden, side, tokens, cols = defaultdict(list), [], [], []
    for examples, b in _batches(proc, eos_id, n, types=("position",), mc_fraction=0.0, targets=False):
        keep = [i for i, ex in enumerate(examples) if "left or right" in ex["qas"][0].question]
        b.pop("labels")
        out = model(**b, output_hidden_states=True)
        for layer, h in enumerate(out.hidden_states):
            hidden[layer].append(h[keep, -1])  # the last prompt token predicts the answer
        side += [int(examples[i]["qas"][0].answer == "right") for i in keep]
        for i in keep:
            tokens.append(out.hidden_states[0][i, b["input_ids"][i] == image_id])
            cols.append(torch.arange(GRID * GRID) % GRID)
    with torch.enable_grad():
        y = torch.tensor(side)
        return {"answer_token_after_layer": [_probe(torch.cat(h).float(), y, 2) for _, h in sorted(hidden.items())],
                "visual_token_column_at_lm_input": _probe(torch.cat(tokens).float(), torch.cat(cols), GRID),
                "n": len(side), "right_fraction": round(y.float().mean().item(), 3)}


@torch.no_grad()
def look_back(model, proc, eos_id: int, n: int, batch: int = 8, native: bool = False) -> dict:
    rng = random.Random(VIDEO_SEED)
    seen, fresh, hidden, new = [], [], defaultdict(list), []
    for start in range(0, n, batch):
        examples = train_tiny.sample_examples(rng, min(batch, n - start), True, 1)
        b = train_tiny.collate(proc, examples, eos_id, native=native)
        look, novelty = b["look"], b["novelty"]
        _model_inputs(b)
        out = model(**b, output_attentions=True, output_hidden_states=True)
        mass = torch.stack([(a[look.rows, :, look.pos] * (look.share > 0)[:, None]).sum(-1) for a in out.attentions],
                           1)  # [N, layers, H]
        is_new = novelty[look.rows, look.pos] == 1
        seen.append(mass[~is_new]), fresh.append(mass[is_new])
        sel = novelty >= 0
        for layer, h in enumerate(out.hidden_states):
            hidden[layer].append(h[sel])
        new.append(novelty[sel])
    with torch.enable_grad():
        y = torch.cat(new)
        probe = [_probe(torch.cat(h).float(), y, 2) for _, h in sorted(hidden.items())]
    rounded = lambda m: [[round(x, 3) for x in layer] for layer in torch.cat(m).mean(0).tolist()]  # noqa: E731
    return {"seen_mass_on_previous_frame": rounded(seen), "new_mass_on_first_token": rounded(fresh),
            "novelty_probe_after_layer": probe, "n_tokens": len(y), "new_fraction": round(y.float().mean().item(), 3)}


@torch.no_grad()
def distinct_count(model, proc, eos_id: int, n: int, batch: int = 8, native: bool = False) -> dict:
    """Open "how many distinct objects appeared ?" questions: where the count is lost. Per true count: the
    greedy answer's accuracy and the answer token's share of its frame-count-layer attention (mean of
    the heads) on the frames that show a new object, among all frame tokens (``--frame-weight``'s target
    is k / frames). Then probes reading the count from that share alone and from the answer token's
    hidden state after each layer (the first 70% of the questions fit them)."""
    rng = random.Random(VIDEO_SEED)
    right, shares, hidden, counts = defaultdict(list), [], defaultdict(list), []
    for start in range(0, n, batch):
        examples = train_tiny.sample_examples(rng, min(batch, n - start), True, 1, 0.0, ("distinct",))
        b = train_tiny.collate(proc, examples, eos_id, native=native)
        frames = b["frames"]
        _model_inputs(b)
        out = model(**b, output_attentions=True, output_hidden_states=True)
        pred = out.logits[:, -3].argmax(-1)  # the token before the answer word (left padding)
        att = out.attentions[train_tiny.FRAME_COUNT_LAYER][:, :, -3].mean(1)  # [B, L]
        for i, ex in enumerate(examples):
            answer = ex["qas"][0].answer
            on = frames.rows == i
            mass = att[i, frames.pos[on]]
            shares.append((mass * frames.new[on]).sum().item() / max(mass.sum().item(), 1e-9))
            right[answer].append(int(proc.tokenizer.decode([pred[i].item()]).strip() == answer))
            counts.append(answer)
        for layer, h in enumerate(out.hidden_states):
            hidden[layer].append(h[:, -3])
    names = sorted(set(counts))
    y = torch.tensor([names.index(c) for c in counts])
    share = torch.tensor(shares)
    with torch.enable_grad():
        by_share = _probe(share[:, None], y, len(names), steps=1000)
        by_layer = [_probe(torch.cat(h).float(), y, len(names)) for _, h in sorted(hidden.items())]
    per = {c: {"n": len(right[c]), "accuracy": round(sum(right[c]) / len(right[c]), 3),
               "share_on_new_frames": round(share[y == k].mean().item(), 3)} for k, c in enumerate(names)}
    total = sum(map(sum, right.values())) / len(counts)
    return {"accuracy": round(total, 3), "by_count": per, "count_probe_from_share": by_share,
            "count_probe_after_layer": by_layer, "n": len(counts)}


def main(argv=None):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a trained checkpoint directory, or a shipped model (tiny-llava, tiny-qwen2-vl)")
    ap.add_argument("--n", type=int, default=256, help="held-out image questions (the probe uses 3x as many position ones)")
    ap.add_argument("--videos", type=int, default=64, help="held-out videos for look_back and distinct_count")
    native_video.add_video_mode_option(ap)
    ap.add_argument("--out", default=None, help="also write the result here (JSON)")
    args = ap.parse_args(argv)
    args.model = shipped.resolve(args.model)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(args.model, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(args.model)
    eos_id = model.config.get_text_config().eos_token_id
    native = native_video.reads_native(proc, args.video_mode)
    acc, mass = accuracy_and_mass(model, proc, eos_id, args.n)
    result = {"model": args.model, "video_mode": "native" if native else "frames", "accuracy": acc, "object_mass": mass,
              "left_right_probe": left_right_probe(model, proc, eos_id, 3 * args.n),
              "look_back": look_back(model, proc, eos_id, args.videos, native=native),
              "distinct_count": distinct_count(model, proc, eos_id, args.videos, native=native)}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
