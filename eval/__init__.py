"""tokensieve.eval: evaluating plans.

User tools at this level: ``report`` (accuracy against budget on the shape world), ``bench_engine``
(measured speed). ``shapeworld/`` holds the synthetic benchmark world, the tiny models trained on
it (``shapeworld.shipped``: the embedded default) and their training research.
"""
