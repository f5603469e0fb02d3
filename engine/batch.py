"""A padded batch: the processor's output for a group of checked requests, and what the engine
needs to know about every request's visual tokens.

Visual tokens of a request are numbered in sequence order (its "original" coordinates): the
tokens of its images and, with a native video, of its video, as the processor laid them out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import Adapter
from .errors import InputError, PlanError
from .request import CheckedRequest


@dataclass
class Batch:
    """A padded batch on its way through the model."""

    reqs: list[CheckedRequest]
    inputs: dict
    n_visual: list[int]
    images_of: list[list[int]]  # request -> its image indices in the processor's image order
    video_of: list[int | None]  # request -> its native video's index in the processor's video order
    coords: list[torch.Tensor]  # request -> [N_vis, 3] (item, row, col)
    frames: list[torch.Tensor]  # request -> [N_vis] frame of each visual token (-1: a still image's)
    is_video: list[torch.Tensor]  # request -> [N_vis] bool: the token is a native video token
    tower_seqs: list[list[int]]  # request -> length of every sequence its images / video put through the tower

    def n_video(self, b: int) -> int:
        return int((self.frames[b] >= 0).sum())


def process(processor, adapter: Adapter, reqs: list[CheckedRequest]) -> dict:
    """The processor's padded output for these requests (images first in request order, then videos), padded
    on the left (``padding_side`` given per call: the caller's processor and tokenizer are left as they are)."""
    per_request = [r.images for r in reqs]
    videos = [r.video for r in reqs if r.native_video]
    if videos and any(r.images for r in reqs) and not adapter.video_with_images:
        raise InputError(f"'{adapter.family}' takes images and native videos in separate processor calls: give "
                         "requests with a video (video_mode='native') and requests with images apart")
    kwargs = adapter.video_inputs(videos) if videos else {}
    images = adapter.batch_images(per_request) if any(per_request) else None
    inputs = processor(text=[r.text for r in reqs], images=images, padding=True, padding_side="left",
                       return_tensors="pt", **(adapter.image_settings() if images else {}), **kwargs)
    inputs.update(adapter.layout_inputs(reqs))
    return inputs


def build_batch(processor, adapter: Adapter, idx: list[int], reqs: list[CheckedRequest]) -> Batch:
    """Run the processor and lay out each request's visual tokens; PlanError (naming the request) when a
    stage's budget does not fit the tokens it gets."""
    inputs = process(processor, adapter, reqs)
    ids = inputs["input_ids"]
    vis = torch.isin(ids, torch.tensor(adapter.visual_token_ids))
    video_masks = adapter.video_token_mask(inputs, reqs)
    images_of, video_of, n_img, n_vid = [], [], 0, 0
    for r in reqs:
        images_of.append(list(range(n_img, n_img + len(r.images))))
        n_img += len(r.images)
        video_of.append(n_vid if r.native_video else None)
        n_vid += int(r.native_video)
    img_coords = adapter.image_coords(inputs) if n_img else []
    vid_coords = adapter.video_coords(inputs) if n_vid else []
    img_seqs = adapter.tower_sequences(inputs) if n_img else []
    vid_seqs = adapter.video_tower_sequences(inputs) if n_vid else []
    coords, frames, is_video, seqs = [], [], [], []
    for b, r in enumerate(reqs):
        is_vid = video_masks[b]
        c, f = _request_layout(r, images_of[b], img_coords, vid_coords[video_of[b]] if r.native_video else None, is_vid)
        coords.append(c)
        frames.append(f)
        is_video.append(is_vid)
        seqs.append([n for i in images_of[b] for n in img_seqs[i]] + (vid_seqs[video_of[b]] if r.native_video else []))
    n_visual = vis.sum(1).tolist()
    for b, r in enumerate(reqs):
        if r.priority is not None and r.priority.numel() != n_visual[b]:
            raise InputError(f"request {idx[b]}: priority has {r.priority.numel()} values but its images and video "
                             f"give {n_visual[b]} visual tokens")
    context = getattr(adapter.text_config, "max_position_embeddings", None)
    for i, r, n, f, n_tok in zip(idx, reqs, n_visual, frames, inputs["attention_mask"].sum(1).tolist()):
        try:
            r.plan.keep_counts(n, max(len(r.images), 1), int((f >= 0).sum()))
        except PlanError as e:
            raise PlanError(f"request {i}: {e}") from None
        if context is not None and n_tok + r.max_new_tokens > context:
            raise InputError(f"request {i}: {n_tok} prompt tokens ({n} of them visual) + max_new_tokens "
                             f"{r.max_new_tokens} exceed the model's context of {context} positions "
                             "(max_position_embeddings); give fewer frames (nframes / fps) or images, a shorter "
                             "prompt or fewer new tokens")
    return Batch(reqs=reqs, inputs=inputs, n_visual=n_visual, images_of=images_of, video_of=video_of, coords=coords,
                 frames=frames, is_video=is_video, tower_seqs=seqs)


def _request_layout(req: CheckedRequest, images: list[int], img_coords, vid_coords, is_vid: torch.Tensor):
    """[N_vis, 3] coords and [N_vis] frame index of one request's visual tokens, in sequence order.

    Items are numbered within the request: its images (tiles) first, then its video's frames.
    Video frames entering as images (video_mode "frames") are the request's last ``n_frames`` images.
    """
    parts, frame_parts, n_items = [], [], 0
    first_frame = len(images) - req.n_frames
    for j, i in enumerate(images):
        parts.append(img_coords[i] + torch.tensor([n_items, 0, 0]))
        frame_parts.append(torch.full((img_coords[i].shape[0],), j - first_frame if j >= first_frame else -1))
        n_items += int(img_coords[i][:, 0].max()) + 1
    n = is_vid.numel()
    coords = torch.zeros(n, 3, dtype=torch.long)
    frames = torch.full((n,), -1, dtype=torch.long)
    if parts:
        if int((~is_vid).sum()) != sum(p.shape[0] for p in parts):
            raise RuntimeError(f"adapter coords ({sum(p.shape[0] for p in parts)}) != image tokens ({int((~is_vid).sum())})")
        coords[~is_vid], frames[~is_vid] = torch.cat(parts), torch.cat(frame_parts)
    if vid_coords is not None:
        if int(is_vid.sum()) != vid_coords.shape[0]:
            raise RuntimeError(f"adapter video coords ({vid_coords.shape[0]}) != video tokens ({int(is_vid.sum())})")
        coords[is_vid] = vid_coords + torch.tensor([n_items, 0, 0])
        frames[is_vid] = vid_coords[:, 0]
    return coords, frames


def assemble(per_image: list[torch.Tensor], per_video: list[torch.Tensor], batch: Batch, b: int) -> torch.Tensor | None:
    """Request b's visual features [N_vis, D] in sequence order from the per-image and per-video features."""
    parts = [per_image[i] for i in batch.images_of[b]]
    vid = batch.video_of[b]
    if not parts and vid is None:
        return None
    ref = parts[0] if parts else per_video[vid]
    out = ref.new_zeros(batch.n_visual[b], ref.shape[-1])
    is_vid = batch.is_video[b].to(ref.device)
    if parts:
        out[~is_vid] = torch.cat(parts)
    if vid is not None:
        out[is_vid] = per_video[vid].to(ref.dtype)
    return out
