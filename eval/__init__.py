"""tokensieve.eval: evaluating plans.

User tools at this level: ``videoqa`` (``tokensieve eval``: batch video QA, with ``readers``, ``answers``,
``summary``, ``runner`` and ``ray_runner``), ``lmms_plugin`` (lmms-eval), ``bench`` (``tokensieve bench``:
measured speed, with ``bench_models`` and ``bench_configs/``), ``report`` (accuracy against budget on the
shape world). ``shapeworld/`` holds the synthetic benchmark world, the tiny models trained on it
(``shapeworld.shipped``: the embedded default) and their training research.
"""
