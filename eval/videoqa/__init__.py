"""The batch video-QA evaluation, ``tokensieve eval`` (``python -m tokensieve.eval.videoqa``).

``command`` (options, checks, resume and the run), ``runner`` (batched runs, records written sample by sample),
``ray_runner`` (the same on Ray Data), ``readers`` (JSONL, Video-MME, MVBench, NExT-QA, MLVU, EgoSchema),
``answers`` (parsing and scoring), ``summary`` (tables and plots), ``lmms_plugin`` (lmms-eval's model entry point).
"""
from .command import main

__all__ = ["main"]
