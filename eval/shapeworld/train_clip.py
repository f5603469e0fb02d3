"""Train a tiny open_clip model contrastively on the shape world's images and captions (CPU friendly).

    python -m tokensieve.eval.shapeworld.train_clip --out runs/tiny-clip

Saved in open_clip's local-dir format (``open_clip_config.json`` + ``open_clip_model.safetensors``),
so that ``open_clip.create_model_and_transforms("local-dir:<out>")`` and
``open_clip.get_tokenizer("local-dir:<out>")`` load it with no network: this is the CLIP that
frame scorers (QuoTA / KeyScore style) use offline. Captions name every object ("a red circle
top-left , a small blue square ..."); the held-out check is retrieval among 32 images and
whether a query naming one object ("red circle") scores a frame that has it above one that does not.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
import torch.nn.functional as F

from . import world
from .tiny_models import IMAGE, MEAN, STD

MODEL_CFG = {"embed_dim": 64,
             "vision_cfg": {"image_size": IMAGE, "layers": 4, "width": 128, "head_width": 32, "patch_size": 12},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
PREPROCESS_CFG = {"mean": MEAN, "std": STD, "interpolation": "bicubic", "resize_mode": "shortest"}


def caption(scene: world.Scene, rng: random.Random) -> str:
    """Every object, in random order, with its size and quadrant."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    return " , ".join(f"a {o.size} {o.name} {world.quadrant(o)}" for o in objs)


def batch(rng: random.Random, n: int, preprocess, tokenizer):
    scenes = [world.random_scene(rng, size=IMAGE) for _ in range(n)]
    images = torch.stack([preprocess(world.render(s)) for s in scenes])
    return scenes, images, tokenizer([caption(s, rng) for s in scenes])


@torch.no_grad()
def evaluate(model, preprocess, tokenizer, seed: int, n: int = 256) -> dict:
    """Held-out (another seed): image -> caption top-1 among 32, and object-query frame ranking."""
    model.eval()
    rng = random.Random(seed)
    hits = pairs = wins = 0
    for _ in range(n // 32):
        scenes, images, texts = batch(rng, 32, preprocess, tokenizer)
        img = F.normalize(model.encode_image(images), dim=-1)
        sim = img @ F.normalize(model.encode_text(texts), dim=-1).T
        hits += (sim.argmax(1) == torch.arange(32)).sum().item()
        for i in range(0, 32, 2):  # a query naming an object of scene i but of no object in scene i + 1
            names = {o.name for o in scenes[i].objects} - {o.name for o in scenes[i + 1].objects}
            if not names:
                continue
            q = F.normalize(model.encode_text(tokenizer([f"a {rng.choice(sorted(names))}"])), dim=-1)[0]
            wins += int(img[i] @ q > img[i + 1] @ q)
            pairs += 1
    model.train()
    return {"retrieval_top1_of_32": round(hits / (n // 32 * 32), 4), "object_query_ranking": round(wins / max(pairs, 1), 4)}


def write_config(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, f, indent=2)


def save(model, out: str) -> None:
    """Weights in fp16 (half the bytes; open_clip loads them into its fp32 model)."""
    from safetensors.torch import save_file
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              os.path.join(out, "open_clip_model.safetensors"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args(argv)
    try:
        import open_clip
    except ImportError:
        raise SystemExit("train_clip needs open_clip: pip install 'tokensieve[clip]'") from None
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    write_config(args.out)  # then build the model the way users will load it (random init: no weights yet)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{args.out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{args.out}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    rng, t0 = random.Random(args.seed), time.time()
    log = open(os.path.join(args.out, "train_log.jsonl"), "a")
    for step in tqdm(range(1, args.steps + 1), desc="train_clip"):
        _, images, texts = batch(rng, args.batch, preprocess, tokenizer)
        img, txt, scale = model(images, texts)[:3]
        logits = scale * img @ txt.T
        target = torch.arange(len(images))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, preprocess, tokenizer, seed=10_000 + args.seed)
            log.write(json.dumps({"step": step, "loss": round(loss.item(), 4), "held_out": acc,
                                  "s": round(time.time() - t0)}) + "\n")
            log.flush()
            tqdm.write(f"step {step} loss {loss.item():.3f} held-out {acc}")
            save(model, args.out)


if __name__ == "__main__":
    main()
