"""``train_tiny``'s command-line options: what each does, and one clear error for those out of range."""
from __future__ import annotations

import argparse
import os

from . import tiny_models


def parse(argv=None, description: str | None = None) -> argparse.Namespace:
    """The options of ``python -m tokensieve.eval.shapeworld.train_tiny`` (checked by ``check``)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llava", choices=sorted(tiny_models.BUILDERS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3000, help="the length of the learning-rate schedule")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="end after this step of the --steps schedule, evaluated and saved (what docs/training.md "
                         "calls a run stopped at that step)")
    ap.add_argument("--batch", type=int, default=32, help="image examples per step")
    ap.add_argument("--video-batch", type=int, default=4, help="video examples per step (after --video-from)")
    ap.add_argument("--video-from", type=int, default=0, help="first step with video examples")
    ap.add_argument("--turns", type=int, default=6, help="questions per training image / video (one chat turn each)")
    ap.add_argument("--curriculum", type=int, default=150,
                    help="open one question type every this many steps (image types, then video types from "
                         "--video-from); multiple choice once all are open; 0: everything from the start")
    ap.add_argument("--free-fraction", type=float, default=0.0,
                    help="share of training images (tower phase and LM steps) whose objects sit anywhere (world "
                         "layout 'free': continuous positions, sizes, touching objects, varied backgrounds); 0: lattice "
                         "scenes only")
    ap.add_argument("--mc-fraction", type=float, default=0.2,
                    help="share of the turns asked in the multiple-choice form (A-D, answer a letter) once every "
                         "image type is open")
    ap.add_argument("--tower-steps", type=int, default=400,
                    help="phase 1: steps (of 64 images) training only the tower + projector on the per-token targets")
    ap.add_argument("--tower-from", default=None,
                    help="start from the tower + projector of this checkpoint (a fresh language model; implies no phase 1)")
    ap.add_argument("--init-from", default=None,
                    help="start from every weight of this checkpoint (continue training a model; implies no phase 1)")
    ap.add_argument("--embed-std", type=float, default=None, help="initial std of the word embeddings (default: the config's)")
    ap.add_argument("--freeze-tower", action="store_true",
                    help="after phase 1, keep the tower and projector fixed (LLaVA's stage-2 recipe freezes the tower)")
    ap.add_argument("--train-projector", action="store_true",
                    help="with --freeze-tower, still train the projector / merger (LLaVA's stage 2 trains it)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lm-lr", type=float, default=None, help="learning rate of the language model (default: --lr)")
    ap.add_argument("--reader-lr", type=float, default=None,
                    help="learning rate of the loss readers (fresh in every run, never saved; default: the LM's): a "
                         "continued run at a low --lr otherwise gives new readers, hence new losses, little signal")
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--ground-weight", type=float, default=1.0,
                    help="weight of the grounding loss: the answer token's attention on the question's objects "
                         "(needs eager attention in the LM while training; 0: off)")
    ap.add_argument("--ground-per-head", action="store_true",
                    help="the grounding loss per head (mean of each head's -log mass) instead of -log of the heads' "
                         "mean mass: every head of layer 2 must find the question's objects")
    ap.add_argument("--word-weight", type=float, default=0.0,
                    help="weight of the word loss: the answer token's attention in LM layer 1 must put one head's worth "
                         "of mass on the colour / shape words its question names (objectives.word_loss)")
    ap.add_argument("--query-weight", type=float, default=0.0,
                    help="weight of the query loss: a linear reader (not saved) must tell the colour and shape the "
                         "question names from the answer token right after LM layer 1, the input of the grounded "
                         "layer 2 (objectives.query_loss)")
    ap.add_argument("--position-weight", type=float, default=0.0,
                    help="weight of the position loss: a linear reader (not saved) must tell each visual token's row "
                         "and column from its hidden state after LM layer 1 (objectives.position_loss)")
    ap.add_argument("--readout-weight", type=float, default=0.0,
                    help="weight of the readout loss: a linear reader (not saved) must tell the referred object's "
                         "colour, shape and half-plane from the answer token right after the grounded layer")
    ap.add_argument("--readout-layers", type=int, nargs="+", default=[2],
                    help="LM layers after which the readout loss applies (one reader for all): 2 3 also asks the "
                         "last layer to keep what the grounded layer gathered")
    ap.add_argument("--option-weight", type=float, default=0.0,
                    help="weight of the option loss: on a multiple-choice turn, the answer token's attention in the "
                         "last LM layer (mean of its heads) on the right option's word, whose letter is the answer")
    ap.add_argument("--letter-weight", type=float, default=0.0,
                    help="weight of the letter loss: a linear reader (not saved) must tell each multiple-choice "
                         "option word's letter from its hidden state after layer 2")
    ap.add_argument("--novelty-weight", type=float, default=0.0,
                    help="weight of the novelty loss: a linear reader (not saved) must tell from each video object "
                         "token's hidden state after LM layer 1 whether its object is new in that frame")
    ap.add_argument("--novelty-centres", action="store_true",
                    help="the novelty target on each object's centre token only (one token per object)")
    ap.add_argument("--distinct-sink", type=float, default=0.0,
                    help="> 0: a distinct question's answer token is trained (loss weight: --ground-weight) to pay "
                         "each head's attention in layer 2 as this weight on the first token (a sink) and 1 on each "
                         "object's centre in the first frame it shows (objectives.sink_share): a share that grows "
                         "with the number of objects")
    ap.add_argument("--count-sink", type=float, default=0.0,
                    help="with --count-readout, the same attention target as --distinct-sink for a still image's "
                         "count question: this weight on the first token, 1 on each counted object's centre")
    ap.add_argument("--count-readout", action="store_true",
                    help="count questions are read out (the count, from the same token) instead of grounded")
    ap.add_argument("--distinct-readout", action="store_true",
                    help="video distinct questions are read out (the number of objects) instead of grounded")
    ap.add_argument("--order-first", action="store_true",
                    help="order questions are grounded on the earlier object before the later one shows, and read "
                         "out its colour and shape (default: grounded on both objects in every frame)")
    ap.add_argument("--frame-weight", type=float, default=0.0,
                    help="each video frame's last token must look at (layer 2) and tell (after layer 2) whether the "
                         "frame shows a new object; a distinct answer's layer 3 puts 1/frames on each such token")
    ap.add_argument("--count-after-frames", action="store_true",
                    help="with --frame-weight, an open distinct answer's count is read out only after the frame-count "
                         "layer 3, not after earlier --readout-layers (where no frame count exists yet)")
    ap.add_argument("--look-weight", type=float, default=0.0,
                    help="weight of the look-back loss: each video object token's attention in --look-layer (its "
                         "--look-heads) falls on its object's tokens in the last earlier frame showing "
                         "it, or on the first token where the object is new (video_targets.look_targets): the lookup "
                         "the novelty reader needs, trained on the attention itself")
    ap.add_argument("--look-layer", type=int, default=1, help="the LM layer of the look-back loss")
    ap.add_argument("--look-heads", type=int, nargs="+", default=[0],
                    help="the heads of --look-layer that look back (the others stay free)")
    ap.add_argument("--visual-share-weight", type=float, default=0.0,
                    help="weight of the visual-share loss: the answer token's head-mean attention in "
                         "--visual-share-layer, counted over the visual tokens only, falls on the question's objects "
                         "(objectives.visual_share_loss): the ranking FastV-style pruners read, one layer before the "
                         "grounded layer 2")
    ap.add_argument("--visual-share-layer", type=int, default=1, help="the LM layer of the visual-share loss")
    ap.add_argument("--lossy-fraction", type=float, default=0.0,
                    help="share of training examples whose rendered images pass through ordinary lossy media first "
                         "(lossy.degrade: JPEG of random quality, or an mpeg4 / yuv420p stream for a video); 0: none")
    ap.add_argument("--typed-fraction", type=float, default=0.0,
                    help="share of open training questions written the ways people type them (phrasing.rephrase; "
                         "the tokenizer's normaliser is on while training too)")
    ap.add_argument("--native-fraction", type=float, default=0.0,
                    help="share of the video batches (and of the tower phase's steps) entering as native videos: "
                         "temporal patches of two frames (native_video; Qwen2-VL, the engine's default video mode); "
                         "0: videos as frames only")
    ap.add_argument("--width-rope-scale", type=float, default=None,
                    help="qwen2_vl only: multiply the LM's M-RoPE width frequencies by this (21.5: as height's; "
                         "tiny_models.mrope_parameters); with --init-from, the checkpoint's other weights are kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=256)
    args = ap.parse_args(argv)
    check(args)
    return args


def check(args: argparse.Namespace) -> None:
    """One clear error (SystemExit) for options out of range or that do not go together."""
    if args.steps < 1 or args.batch < 1:
        raise SystemExit("--steps and --batch must be positive")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        raise SystemExit(f"--stop-at must be a step 1-{args.steps} of --steps, got {args.stop_at}")
    for name in ("free_fraction", "lossy_fraction", "typed_fraction", "mc_fraction", "native_fraction"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if not 0 <= args.visual_share_layer < tiny_models.LM["num_hidden_layers"] or args.visual_share_weight < 0:
        raise SystemExit(f"--visual-share-layer must be an LM layer and --visual-share-weight >= 0, got "
                         f"{args.visual_share_layer}, {args.visual_share_weight}")
    if args.init_from and args.tower_from:
        raise SystemExit("--init-from already holds a tower: give --init-from or --tower-from, not both")
    n_layers = tiny_models.LM["num_hidden_layers"]
    if not all(0 <= layer < n_layers for layer in args.readout_layers):
        raise SystemExit(f"--readout-layers must be LM layers 0-{n_layers - 1}, got {args.readout_layers}")
    if args.frame_weight < 0 or args.look_weight < 0:
        raise SystemExit(f"--frame-weight and --look-weight must be >= 0, got {args.frame_weight}, {args.look_weight}")
    n_heads = tiny_models.LM["num_attention_heads"]
    if not 0 <= args.look_layer < n_layers or not all(0 <= h < n_heads for h in args.look_heads):
        raise SystemExit(f"--look-layer must be an LM layer 0-{n_layers - 1} and --look-heads heads 0-{n_heads - 1}, "
                         f"got {args.look_layer}, {args.look_heads}")
    if args.distinct_sink < 0 or args.count_sink < 0:
        raise SystemExit(f"--distinct-sink and --count-sink must be >= 0, got {args.distinct_sink}, {args.count_sink}")
    if args.width_rope_scale is not None and (args.family != "qwen2_vl" or args.width_rope_scale <= 0):
        raise SystemExit(f"--width-rope-scale is a positive factor for --family qwen2_vl (M-RoPE), got "
                         f"{args.width_rope_scale} for {args.family}")
