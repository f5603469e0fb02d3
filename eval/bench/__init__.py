"""The speed benchmark, ``tokensieve bench`` (``python -m tokensieve.eval.bench``): ``command`` (timing plans
against the unpruned model and the FLOP ideal, the tables and plot), ``models`` (random-weight models of the
real 7B configurations in ``configs/``, from each family's adapter module), ``gpu.sh`` (the GPU tables in one
call)."""
from .command import main

__all__ = ["main"]
