"""Choosing a plan for a target, ``tokensieve tune`` (``python -m tokensieve.eval.tune``): ``command`` (the sweep
on a calibration set through ``tokensieve eval``, the outputs), ``front`` (the Pareto fronts and the choice, pure
functions of the calibration table)."""
from .command import main

__all__ = ["main"]
