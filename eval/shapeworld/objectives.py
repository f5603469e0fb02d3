"""What the tiny VLMs are trained toward besides the answer: per-turn targets (where the answer token
should look, what it should find there, the multiple-choice letters) built from the world's ground
truth, per-token targets of the visual tokens, and the losses that use them (``train_tiny``).

Pure functions of tensors and scenes; shapes in the docstrings (T turns, L tokens, D hidden size)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .tiny_models import GRID
from .video_targets import first_frames, frame_slots

TARGETS = ("colour", "shape", "centre", "row", "col")  # what each visual token is trained to tell
N_CLASSES = (1 + len(world.COLOURS), 1 + len(world.SHAPES), 2, GRID, GRID)


@dataclass(frozen=True)
class TargetOptions:
    """Which questions are read out instead of grounded, and where order questions look."""
    count_readout: bool = False  # a still image's count question: read out its count
    distinct_readout: bool = False  # a video's distinct question: read out its number of objects
    order_first: bool = False  # an order question: ground on (and read out) the earlier object, before the later one shows
    novelty_centres: bool = False  # novelty targets on each object's centre token only (one token per object)
    distinct_sink: float = 0.0  # > 0: a distinct question's attention target, sink weight vs 1 per object (share)
    count_sink: float = 0.0  # > 0: the same for a still image's count question read out (count_readout)
    distinct_frames: bool = False  # a distinct question's layer-3 target: 1/frames on each frame's last token


class Grounding(NamedTuple):
    """Per-turn targets of the grounding, readout and option losses (T turns, L tokens)."""
    rows: torch.Tensor  # [T] example index
    pos: torch.Tensor  # [T] position of the token that predicts the answer
    mask: torch.Tensor  # [T, L] the visual tokens showing the question's objects
    attrs: torch.Tensor  # [T, len(READOUT)] readout targets, -100: none
    grounded: torch.Tensor  # [T] bool: the grounding loss applies (mask is not empty)
    option: torch.Tensor  # [T, L] multiple choice: the word of the right option (else empty)
    letters: torch.Tensor  # [T, L] multiple choice: each option's word holds its letter (0-3), -100 elsewhere
    share: torch.Tensor  # [T, L] float: a target attention distribution (rows sum to 1), else all 0
    named: torch.Tensor  # [T, len(NAMED)] the colour and shape the question names (named_words), -100: none
    words: torch.Tensor  # [T, L] the tokens of those words in the turn's question
    frames: torch.Tensor  # [T, L] float: distinct_frames' target distribution (rows sum to 1), else all 0


def grounding_targets(proc, examples: list[dict], ids: torch.Tensor, marker: int,
                      options: TargetOptions = TargetOptions()) -> Grounding | None:
    """Where each answer should look and what it should find there: one row per turn whose question
    refers to objects (``QA.refs``) visible in some frame, or is multiple choice. The object's
    attributes are the readout targets of a turn about one object of a still image; a multiple-choice
    turn also marks its right option's word (``A . red``: the ``red``; the letter before it is the answer)
    and the letter of every option at that option's word (the letter loss).

    With ``options.count_readout`` a still image's count question is read out (its count) instead of
    grounded (whatever the count, even 0): the grounding loss drives the attention mass on the
    counted objects to 1, which leaves nothing in an attention average that grows with their number.
    With ``options.distinct_readout`` a video's distinct question ("how many distinct objects appeared ?") is
    read out the same way (the number of its objects) instead of grounded on every frame. With
    ``options.order_first`` an order question ("which shape came first , X or Y ?", refs: the earlier
    object, then the later) is grounded on the earlier object in the frames before the later one shows
    (both objects on every frame tell nothing of which came first), and that object's colour and shape
    are its readout targets. With ``options.distinct_sink`` = c > 0 a distinct question read out also
    gets a ``share`` target (``sink_share``), with ``options.count_sink`` a still image's count question
    read out. With ``options.distinct_frames`` a distinct question that is not multiple choice also gets a
    ``frames`` target: 1 / frames on each frame's last visual token (``video_targets.frame_targets``), a fixed
    denominator: the mass that lands on frames showing a new object is (number of objects) / frames."""
    rows, pos, masks, attrs, grounded, right_options, letters, shares, named, words, frame_shares = ([] for _ in range(11))
    pad = proc.tokenizer.pad_token_id
    for b, ex in enumerate(examples):
        slots = frame_slots(proc, ids[b], len(ex["scenes"]))  # [frames, 64]
        cells = [world.object_cells(s, GRID) for s in ex["scenes"]]
        first_shown = first_frames(cells)
        turn_start = 0
        for qa, at in zip(ex["qas"], (ids[b] == marker).nonzero().flatten().tolist()):
            letter = option_letters(proc.tokenizer, qa, ids[b], at)
            option = letter == LETTERS.find(qa.answer)  # (an open question's letters are all -100)
            refs, frames = qa.refs, len(cells)
            ordered = options.order_first and qa.type == "order"
            if ordered:  # the earlier object, in the frames before the later one first shows
                refs, frames = qa.refs[:1], first_shown[qa.refs[1]]
            mask = torch.zeros(ids.shape[1], dtype=torch.bool)
            for f, by_uid in enumerate(cells[:frames]):
                for uid in refs:
                    mask[slots[f, by_uid.get(uid, [])]] = True
            still = len(ex["scenes"]) == 1
            counted = ((options.count_readout and still and qa.type == "count")
                       or (options.distinct_readout and qa.type == "distinct"))
            if mask.any() or counted or option.any():
                rows.append(b), pos.append(at), masks.append(mask), right_options.append(option), letters.append(letter)
                grounded.append(bool(mask.any()) and not counted)
                about = [-100] * (len(READOUT) - 1)  # colour, shape, right, bottom of the object asked about
                if len(qa.refs) == 1 and still and not counted:
                    about = object_attributes(ex["scenes"][0], qa.refs[0])
                elif ordered:  # its colour and shape (it may move: no half-plane)
                    about = object_attributes(ex["scenes"][first_shown[refs[0]]], refs[0])[:2] + [-100, -100]
                attrs.append(about + [len(qa.refs) if counted else -100])
                share = torch.zeros(ids.shape[1])
                weight = options.distinct_sink if qa.type == "distinct" else options.count_sink if still else 0.0
                if counted and weight:
                    sink = int((ids[b] != pad).nonzero()[0])
                    share = sink_share(ex["scenes"], slots, first_shown, qa.refs, sink, ids.shape[1], weight)
                shares.append(share)
                frame_share = torch.zeros(ids.shape[1])
                if options.distinct_frames and qa.type == "distinct" and not option.any():
                    frame_share[slots[:, -1]] = 1.0 / len(slots)
                frame_shares.append(frame_share)
                named.append(named_words(qa.question))
                word_ids = [proc.tokenizer.convert_tokens_to_ids(vocab[i])
                            for vocab, i in zip(NAMED_VOCABS, named[-1]) if i >= 0]
                word = torch.zeros(ids.shape[1], dtype=torch.bool)
                word[turn_start:at] = torch.isin(ids[b, turn_start:at], torch.tensor(word_ids, dtype=ids.dtype))
                words.append(word)
            turn_start = at + 1
    if not rows:
        return None
    return Grounding(torch.tensor(rows), torch.tensor(pos), torch.stack(masks), torch.tensor(attrs),
                     torch.tensor(grounded), torch.stack(right_options), torch.stack(letters), torch.stack(shares),
                     torch.tensor(named), torch.stack(words), torch.stack(frame_shares))


def sink_share(scenes: list, slots: torch.Tensor, first: dict[int, int], uids, sink: int, length: int,
               weight: float) -> torch.Tensor:
    """[length] the attention a count answer ("how many ...") should pay: ``weight`` on the ``sink``
    token (the first of the sequence) and 1 on each object's centre token in the first frame it shows
    (a still image: its one frame; no objects, e.g. a count of 0: all of it on the sink),
    normalised. With n objects the objects' share is n / (n + weight), a number that grows with n: an
    attention average over the objects alone is the same whatever n, a fixed sink gives it a
    denominator. slots [frames, GRID * GRID] (frame_slots); first: uid -> first frame (first_frames)."""
    share = torch.zeros(length)
    share[sink] = weight
    for uid in uids:
        o = next(o for o in scenes[first[uid]].objects if o.uid == uid)
        share[slots[first[uid], world.centre_cell(o, GRID)]] += 1.0
    return share / share.sum()


def position_targets(proc, examples: list[dict], ids: torch.Tensor) -> torch.Tensor:
    """[B, L, 2] long: each visual token's row and column in its image's GRID x GRID raster; -100 on
    every other token. (What a token must know of itself for "left or right ?" to be answerable from
    the attention that finds it: attention values carry no rotary position.)"""
    out = torch.full((*ids.shape, 2), -100, dtype=torch.long)
    raster = torch.arange(GRID * GRID)
    for b, ex in enumerate(examples):
        slots = frame_slots(proc, ids[b], len(ex["scenes"]))  # [frames, 64]
        out[b, slots] = torch.stack([raster // GRID, raster % GRID], -1).expand(slots.shape[0], -1, -1)
    return out


LETTERS = "ABCD"  # multiple-choice option letters (world.multiple_choice)


def option_letters(tok, qa, ids: torch.Tensor, at: int) -> torch.Tensor:
    """[L] long: at the word of each option of a multiple-choice question (``<letter> . <word>``, the
    last such triple before position ``at``) the index of its letter in LETTERS; -100 elsewhere and
    everywhere for an open question."""
    out = torch.full((ids.shape[0],), -100, dtype=torch.long)
    dot = tok.convert_tokens_to_ids(".")
    p = torch.arange(2, at)
    for option in qa.options:
        letter, word = option.split(". ", 1)
        letter_id, word_id = tok.convert_tokens_to_ids([letter, word])
        hit = p[(ids[p - 2] == letter_id) & (ids[p - 1] == dot) & (ids[p] == word_id)]
        if len(hit):
            out[hit[-1]] = LETTERS.index(letter)
    return out


NAMED = ("colour", "shape")  # what the query loss asks of the answer token: the words the question names
NAMED_VOCABS = (tuple(world.COLOURS), world.SHAPES)  # the words of each NAMED kind, in index order
N_NAMED = tuple(map(len, NAMED_VOCABS))


def named_words(question: str) -> list[int]:
    """The colour and shape the question's stem (before its first ``?``; not the options) names, as
    indices into COLOURS / SHAPES; -100 where it names none or several ("... , circle or square ?")."""
    words = question.split("?")[0].split()
    out = []
    for vocab in NAMED_VOCABS:
        hits = [vocab.index(w) for w in words if w in vocab]
        out.append(hits[0] if len(hits) == 1 else -100)
    return out


def query_loss(reader, hidden_states, rows: torch.Tensor, pos: torch.Tensor, named: torch.Tensor,
               layer: int = 1) -> torch.Tensor:
    """Summed cross-entropy of a linear ``reader`` that tells the colour and shape the question names
    from the answer-predicting token's hidden state right after ``layer`` (1: the input of the grounded
    layer 2, whose query must select the named object). hidden_states: per layer [B, L, D] (index 0 =
    embeddings); rows, pos [T]; named [T, len(NAMED)] (-100: no target)."""
    logits = reader(hidden_states[layer + 1][rows, pos]).split(N_NAMED, dim=-1)  # each [T, classes]
    return sum(F.cross_entropy(lg, named[:, i], ignore_index=-100) for i, lg in enumerate(logits)
               if (named[:, i] >= 0).any())


READOUT = ("colour", "shape", "right", "bottom", "count")  # what the readout loss asks of the answer token
N_READOUT = (len(world.COLOURS), len(world.SHAPES), 2, 2, 10)


def object_attributes(scene, uid: int) -> list[int]:
    """The READOUT classes of object ``uid``: colour and shape index, right half, bottom half."""
    o = next(o for o in scene.objects if o.uid == uid)
    return [list(world.COLOURS).index(o.colour), world.SHAPES.index(o.shape), int(o.x >= 0.5), int(o.y >= 0.5)]


def cell_targets(scenes: list) -> torch.Tensor:
    """[n_images, GRID * GRID, 5] per-token targets: colour, shape, centre (``world.cell_labels``) and the
    token's row and column in the raster (so a token knows where it is: position questions)."""
    where = torch.stack(torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij"), -1).reshape(-1, 2)
    return torch.stack([torch.cat([torch.from_numpy(np.stack(list(world.cell_labels(s, GRID).values()), -1)), where], -1)
                        for s in scenes])


def grounding_loss(attentions, rows: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, layer: int = 2,
                   per_head: bool = False) -> torch.Tensor:
    """-log of the attention mass, averaged over the heads of ``layer``, that the answer-predicting
    token puts on the question's objects; attentions: per layer [B, H, L, L]; rows, pos [T]; mask [T, L].
    With ``per_head``, the mean over heads of each head's -log mass instead: no head may look elsewhere
    (with the mean of the masses, one head that finds a green object can cover three that do not).

    One fixed layer and all its heads: the query must come from the question. (Taking the best head
    of any layer instead let each head watch one kind of object whatever the question: a loss near 0
    and answers no better.)"""
    probs = attentions[layer][rows, :, pos, :]  # [T, H, L]
    mass = (probs * mask[:, None, :]).sum(-1)  # [T, H]
    if per_head:
        return -mass.clamp_min(1e-6).log().mean()
    return -mass.mean(-1).clamp_min(1e-6).log().mean()


def visual_share_loss(attentions, rows: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor,
                      layer: int = 1) -> torch.Tensor:
    """-log of the share of the answer-predicting token's head-mean attention in ``layer``, counted over the
    visual tokens only (``visual`` [T, L]), that falls on the question's objects (``mask`` [T, L]), averaged
    over turns: exactly the ranking FastV-style pruners read before layer ``layer + 1``. It says nothing of
    how much of the attention goes to visual tokens at all, so the layer's heads stay free to read the
    question's words (``word_loss``). attentions: per layer [B, H, L, L]; rows, pos [T]."""
    probs = attentions[layer][rows, :, pos, :].mean(1)  # [T, L]
    on, seen = (probs * mask).sum(-1), (probs * visual).sum(-1)  # [T]
    return -(on.clamp_min(1e-9) / seen.clamp_min(1e-9)).log().mean()


def word_loss(attentions, rows: torch.Tensor, pos: torch.Tensor, words: torch.Tensor, layer: int = 1
              ) -> torch.Tensor:
    """How far the answer-predicting token's attention in ``layer`` (1: the layer before the grounded one)
    is from one head's worth of mass on the words its question names: max(0, -log(mean over heads of the
    mass on ``words``) - log(H)), averaged over turns; 0 once the heads together put 1 / H there. A
    direct target on the attention: a loss downstream of a softmax saturated at 0 on the word (LLaVA's
    layer 1 looked at "red" and never at "green") has no gradient to move it. attentions: per layer
    [B, H, L, L]; rows, pos [T]; words [T, L]."""
    probs = attentions[layer][rows, :, pos, :]  # [T, H, L]
    mass = (probs * words[:, None, :]).sum(-1).mean(-1)  # [T]
    return (-mass.clamp_min(1e-6).log() - math.log(probs.shape[1])).clamp_min(0).mean()


def share_loss(attentions, rows: torch.Tensor, pos: torch.Tensor, share: torch.Tensor, layer: int = 2,
               heads: tuple[int, ...] | None = None) -> torch.Tensor:
    """KL divergence from the target distribution ``share`` [T, L] (``sink_share``) to each head's
    attention of the answer-predicting token in ``layer``, averaged over heads and turns (0: every head
    pays exactly the target); with ``heads``, over those heads of the layer only (the others stay free).
    attentions: per layer [B, H, L, L]; rows, pos [T]."""
    probs = attentions[layer][rows, :, pos, :]  # [T, H, L]
    log_q = (probs if heads is None else probs[:, list(heads)]).clamp_min(1e-9).log()  # [T, heads, L]
    log_p = torch.where(share > 0, share, 1.0).log()  # [T, L] (0 log 0 = 0)
    return (share[:, None, :] * (log_p[:, None, :] - log_q)).sum(-1).mean()


def readout_loss(reader, hidden_states, rows: torch.Tensor, pos: torch.Tensor, attrs: torch.Tensor,
                 layer: int = 2) -> torch.Tensor:
    """Summed cross-entropy of a linear ``reader`` that tells, from the answer-predicting token's hidden
    state right after ``layer`` (the grounded one), the READOUT attributes of the object the question is
    about: what the grounded attention gathered must reach the answer. hidden_states: per layer
    [B, L, D] (index 0 = embeddings); rows, pos [T]; attrs [T, len(READOUT)] (-100: no target)."""
    logits = reader(hidden_states[layer + 1][rows, pos]).split(N_READOUT, dim=-1)  # each [T, classes]
    return sum(F.cross_entropy(lg, attrs[:, i], ignore_index=-100) for i, lg in enumerate(logits)
               if (attrs[:, i] >= 0).any())


def letter_loss(reader, hidden_states, rows: torch.Tensor, letters: torch.Tensor, layer: int = 2) -> torch.Tensor:
    """Cross-entropy of a linear ``reader`` (D -> len(LETTERS)) that tells each option word's letter from
    its hidden state right after ``layer``: the word must carry the letter before it, so that the last
    layer's attention on the right option's word (the option loss) brings back a letter to answer.
    hidden_states: per layer [B, L, D]; rows [T]; letters [T, L] (-100: not an option word)."""
    hidden = hidden_states[layer + 1][rows]  # [T, L, D]
    sel = letters >= 0
    return F.cross_entropy(reader(hidden[sel]), letters[sel])


def novelty_loss(reader, hidden_states, novelty: torch.Tensor, layer: int = 1) -> torch.Tensor:
    """Cross-entropy of a linear ``reader`` (D -> 2) that tells from a visual token's hidden state right
    after LM ``layer`` (the input of the grounded layer 2) whether its object is new in this frame.
    hidden_states: per layer [B, L, D] (index 0 = embeddings); novelty [B, L] (novelty_targets)."""
    sel = novelty >= 0
    return F.cross_entropy(reader(hidden_states[layer + 1][sel]), novelty[sel])


def position_loss(reader, hidden_states, positions: torch.Tensor, layer: int = 1) -> torch.Tensor:
    """Summed cross-entropy of a linear ``reader`` (D -> GRID + GRID) that tells each visual token's
    row and column from its hidden state right after LM ``layer`` (the input of the grounded layer 2).
    hidden_states: per layer [B, L, D] (index 0 = embeddings); positions [B, L, 2] (position_targets)."""
    sel = positions[..., 0] >= 0
    row, col = reader(hidden_states[layer + 1][sel]).split((GRID, GRID), dim=-1)
    return F.cross_entropy(row, positions[sel][:, 0]) + F.cross_entropy(col, positions[sel][:, 1])


def aux_logits(head, tokens: torch.Tensor, n_images: int) -> tuple[torch.Tensor, ...]:
    """Per-token head logits (one per TARGETS), each [n_images, GRID * GRID, classes];
    tokens [n_images * 64, D] or [n_images, 64, D]."""
    return head(tokens.reshape(n_images, GRID * GRID, -1)).split(N_CLASSES, dim=-1)


def aux_loss(logits: tuple[torch.Tensor, ...], cells: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the per-token heads; cells [n_images, 64, len(TARGETS)]."""
    return sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), cells[..., i].reshape(-1)) for i, lg in enumerate(logits))
