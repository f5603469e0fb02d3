"""The one interface every pruner implements: tensors in, scores and kept indices out.

A pruner knows nothing of the model. The engine hands it the visual tokens entering its
stage for one request, plus the signals it declared (``signals = Signals(...)``: attention rows,
tower records, frame scores, ...); it returns which of those tokens survive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .options import Option


@dataclass
class StageInput:
    """What a pruner sees for one request at one stage.

    tokens:   [N, D] hidden states / features of the visual tokens entering the stage
    keep:     number of tokens to keep (1 <= keep <= N)
    coords:   [N, 3] (item, row, col) of each token in its original grid (item = image, tile or frame)
    attn:     [H, N] attention these tokens receive from the declared query rows (per head, summed
              over the rows with their weights; for one row it is that row's softmax), or None
    options:  the stage's pruner options (validated against the pruner's declared ``options``)
    seed:     base seed of the request (pruners that draw randomness use it)
    Fields below are filled only when the pruner declares it needs them and the family has them.
    """

    tokens: torch.Tensor
    keep: int | None  # None only for an adaptive pruner given plain keep="auto" (its own rule)
    coords: torch.Tensor
    attn: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    tower_score: torch.Tensor | None = None  # [N] the pruner's own ``tower_score``, mapped to these tokens
    keys: torch.Tensor | None = None  # [N, d] head-averaged attention keys of these tokens (vision tower)
    text_attn: torch.Tensor | None = None  # [H, T, N] attention of each text query row to these tokens
    seq_attn: torch.Tensor | None = None  # [H, S, S] softmax attention among all the request's tokens ("all_rows")
    seq_vis: torch.Tensor | None = None  # [N] position of each of these tokens in seq_attn's sequence
    sizes: torch.Tensor | None = None  # [N] how many original tokens each token already stands for
    prefix: int = 0  # tokens ahead of these in the sequence that always stay (the tower's CLS at a vision stage)
    # video (filled for requests with a video): the frame of each token, and per-frame signals
    frames: torch.Tensor | None = None  # [N] frame index of each token (0..T-1), -1 for a token of an image
    spans: torch.Tensor | None = None  # [N, 2] first / last frame of the original tokens each stands for ("video.spans")
    frame_relevance: torch.Tensor | None = None  # [T] P(yes) of a VLM asked whether frame t is relevant (QuoTA)
    frame_embeds: torch.Tensor | None = None  # [T, E] CLIP image embedding of each frame (KeyScore)
    text_embed: torch.Tensor | None = None  # [E] CLIP text embedding of the question (KeyScore)
    priority: torch.Tensor | None = None  # [N] the request's own priority of these tokens (``priority`` pruner)
    instruction: torch.Tensor | None = None  # [M, D] the question's LLM input embeddings (``llm.instruction``)
    raters: torch.Tensor | None = None  # [T] bool: text rows (of text_attn) that rate the image (``llm.text_raters``)
    # LLM stages at layer K, per request (T: its text tokens after its last visual token): ``llm.keys``,
    # ``llm.normed``, ``llm.positions``
    llm_keys: torch.Tensor | None = None  # [N, H*d] layer K-1's keys of these tokens (RoPE applied, heads flattened)
    text_keys: torch.Tensor | None = None  # [T, H*d] the same of the text tokens
    normed: torch.Tensor | None = None  # [N, D] these tokens entering layer K, through the LLM's final norm
    text_normed: torch.Tensor | None = None  # [T, D] the same of the text tokens
    positions: torch.Tensor | None = None  # [N] index of each of these tokens in its request's prompt
    text_positions: torch.Tensor | None = None  # [T] the same of the text tokens
    patches: torch.Tensor | None = None  # [N, D_tower] feature-layer hidden states of these tokens (``tower.patches``)
    text_embeds: torch.Tensor | None = None  # [M, D] LLM input embeddings of the question's keywords (``request.keywords``)
    # progressive pruners (``Pruner.progressive``), at each of their steps inside the vision tower
    layers_left: int | None = None  # tower layers from this step to the stage's last step (0: the last step)
    carry: torch.Tensor | None = None  # [N] the pruner's running state of these tokens from its previous step
    llm_layers: int | None = None  # LLM stages: the language model's depth (FrameFusion's compute budget)


@dataclass
class Selection:
    """What survives a stage.

    keep_idx: [k] sorted unique indices into the N tokens entering
    scores:   [N] importance of each entering token, or None
    tokens:   [k, D] new hidden states / features for the kept tokens (merging methods), or None
    groups:   [N] for merging methods, the position in keep_idx each entering token was merged
              into (-1: dropped); None means every kept token stands for itself only
    carry:    [k] progressive pruners: running state of the kept tokens, handed back at the next step
    """

    keep_idx: torch.Tensor
    scores: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    carry: torch.Tensor | None = None


@dataclass
class TowerRecord:
    """What the vision tower recorded for one pruner, per tile (image or anyres tile) of the batch.

    Tensors are indexed [n_tiles, ...] over the tower's tokens at that layer, prefix (CLS) first.
        cls[l]        [n, H, S]      softmax attention of the CLS query in layer l
        keys[l]       [n, S, d]      head-averaged keys in layer l
        value_attn[l] [n, H, S]      softmax over the tokens of the CLS value . each value (unscaled), per head
        value_l1[l]   [n, S]         L1 norm of each token's head-mean value vector
        qk[l]         (q, k)         [n, H, S, d] each (for methods that need whole-layer flow)
        received[l]   [n, S]         attention each token receives, mean over heads and query rows (HoliTom)
    """

    prefix: int
    cls: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)
    value_attn: dict = field(default_factory=dict)
    value_l1: dict = field(default_factory=dict)
    qk: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)  # [l] [n, S]: attention each token receives, head and query mean


@dataclass(frozen=True, init=False)
class Signals:
    """The signals a pruner reads, by name: what the engine records for it (at which layer or stage) and
    hands it in ``StageInput``. Every name, where it is recorded and the fields it fills: the table in
    ``engine/signals.py``, the one place that records them.

        signals = Signals("tower.cls", "tower.keys", "tower.features")
        signals = Signals("tower.cls", "tower.values", required=("tower.cls",))

    ``required``: names without which the method is meaningless (the engine refuses the stage where the model
    cannot give them); a name read but not required has a documented surrogate in the pruner.
    """

    reads: frozenset
    required: frozenset

    def __init__(self, *reads: str, required=()):
        object.__setattr__(self, "required", frozenset(required))
        object.__setattr__(self, "reads", frozenset(reads) | self.required)

    def __contains__(self, name: str) -> bool:
        return name in self.reads

    def of(self, source: str, required: bool = False) -> frozenset:
        """The names read from ``source`` ("llm", "tower", "frames", "request"), e.g. {"tower.cls"}
        (``required``: of those required only)."""
        return frozenset(n for n in (self.required if required else self.reads) if n.split(".", 1)[0] == source)


DEFAULT_LAYER_DEPTH = 32  # default layers are the papers' on LLaVA-1.5-7B's 32-layer LLM (engine.plan: the rule)


FLAGS = ("needs", "vision_needs", "requires_tower", "picks_raters", "merge_space", "reads_priority", "frame_signal")


class _View:
    """A read-only class attribute computed from the class's ``signals``."""

    def __init__(self, view):
        self.view = view

    def __get__(self, obj, cls):
        return self.view(cls.signals)


class Pruner:
    """Base class. Subclasses set the class attributes and implement ``select``.

    signals: what the pruner reads, by name (``Signals``; every name and the field it fills: the table in
        ``engine/signals.py``). LLM signals reach its LLM stages; tower signals its vision / pre-LLM stages on
        families whose tower has a CLS token (``tower_score`` via ``tower_score``, ``keys``); frames signals
        its frames stages; ``required`` ones make the engine refuse it where the model lacks them.
    progressive: a vision stage of the pruner prunes before each of its ``vision_steps`` (one plan
        stage); at each step ``select`` gets ``layers_left``, its ``carry`` from the step before and
        the signals of the tower layers since then, and keeps exactly ``keep``: before the last step
        the smallest ``step_keep`` over the images of the tower batch (they must stay one length),
        at the last step the stage's keep.
    """

    name: ClassVar[str]
    wheres: ClassVar[tuple[str, ...]] = ("vision", "pre_llm", "llm")
    default_where: ClassVar[str] = "pre_llm"
    default_layer: ClassVar[int | None] = None  # the paper's layer, set for a DEFAULT_LAYER_DEPTH-layer model
    default_keep: ClassVar[int | float | None] = None
    options: ClassVar[dict[str, Option]] = {}  # name -> declared type, accepted values, default, help
    signals: ClassVar[Signals] = Signals()
    adaptive: ClassVar[bool] = False  # may be given plain keep="auto" (its own rule)
    scored: ClassVar[bool] = False  # its Selection.scores rank the N entering tokens at keep=N (keep=auto,mass=)
    progressive: ClassVar[bool] = False  # prunes step by step inside the vision tower (``vision_steps``)
    # how its official code numbers the LLM sequence after a stage before the LLM: "contiguous" (0..L-1 over the
    # pruned prompt: LLaVA-codebase methods, which prune before the sequence is built) or "original" (each kept
    # token at its unpruned position); a plan's default (``Plan.positions``), cited per pruner in docs/pruners.md
    official_positions: ClassVar[str] = "original"

    # Read-only views of ``signals`` under the names of the class flags it replaced, for readers outside the
    # engine (the CLI, reports); the engine reads ``signals`` (engine/signals.py). A subclass setting one fails.
    vision_needs = _View(lambda s: frozenset(n.split(".", 1)[1] for n in s.of("tower")) - {"features"})
    requires_tower = _View(lambda s: any(n != "tower.received" for n in s.of("tower", required=True)))  # a CLS token
    merge_space = _View(lambda s: "tower" if "tower.features" in s else "llm")
    reads_priority = _View(lambda s: "request.priority" in s)
    frame_signal = _View(lambda s: next((n.split(".", 1)[1] for n in sorted(s.of("frames"))), None))

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        old = [n for n in FLAGS if n in vars(cls)]
        if old:
            raise TypeError(f"{cls.__name__} sets {', '.join(old)}: declare what it reads as signals = Signals(...) "
                            "(the names: engine/signals.py)")

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(self.options)

    def option(self, given: dict, name: str):
        """The value of option ``name``: as the stage gives it (validated by Plan.parse), else its default."""
        return given.get(name, self.options[name].default)

    def select(self, inp: StageInput) -> Selection:
        raise NotImplementedError

    def text_raters(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """visual [N, D], text [T, D] LLM input embeddings of one request -> [T] bool (signal ``llm.text_raters``)."""
        raise NotImplementedError

    def tower_layers(self, last: int, options: dict) -> list[int]:
        """Tower layers to record, given the last layer before the stage (default: that one)."""
        return [last]

    def vision_steps(self, last: int, options: dict) -> list[int]:
        """Progressive pruners: the vision layers before which they prune, ascending, ending at ``last``."""
        return [last]

    def llm_steps(self, layer: int, options: dict) -> list[int]:
        """The LLM layers an LLM stage at ``layer`` acts before, ascending, ending at ``layer`` (default: that
        one). Several: the stage steps through them with ``layers_left`` and ``carry`` as a progressive vision
        stage does, and may keep more than ``keep`` before its last step."""
        return [layer]

    def step_keep(self, inp: StageInput) -> int:
        """Progressive pruners, at a step before the last (``inp.keep``: the stage's keep): how many of the
        N tokens to keep, in [keep, N]."""
        return inp.tokens.shape[0]

    def tower_score(self, rec: TowerRecord, layers: list[int]) -> torch.Tensor:
        """[n, S - prefix] patch importance from the record (default: head-mean CLS attention)."""
        return rec.cls[layers[-1]][:, :, rec.prefix:].float().mean(1)


def cls_or_surrogate(inp: StageInput) -> torch.Tensor:
    """[N] CLS-attention importance; without a CLS token, the documented surrogate:
    the attention of a mean-pooled query over the stage's tokens, softmax(mean(x) . x^T / sqrt(D))."""
    if inp.tower_score is not None:
        return inp.tower_score.float()
    x = inp.tokens.float()
    return torch.softmax(x @ x.mean(0) / x.shape[-1] ** 0.5, dim=0)


def keys_or_tokens(inp: StageInput) -> torch.Tensor:
    """[N, d] the keys used for similarity: tower keys where recorded, else the tokens themselves."""
    return (inp.keys if inp.keys is not None else inp.tokens).float()


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores ([N] -> [k]), in ascending index order."""
    return torch.topk(scores.float(), k, sorted=False).indices.sort().values
