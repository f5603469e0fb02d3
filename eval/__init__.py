"""tokensieve.eval: evaluating plans, one subpackage a job.

- ``videoqa``: the batch video-QA evaluation (``tokensieve eval``): command, runner, Ray runner, readers,
  answers, summary, and the lmms-eval plugin.
- ``bench``: the speed benchmark (``tokensieve bench``): the command, its random-weight models of the real
  configurations, the configurations, the GPU script.
- ``tune``: choosing a plan for a target (``tokensieve tune``): the sweep through ``videoqa``'s runner, the
  Pareto fronts and the choice.
- ``shapeworld``: the synthetic benchmark world, its dataset writer, the training of the tiny models that ship
  with the package (``tokensieve.shipped``), the pruning report and its oracle, diagnose and heldout.

Results the docs cite are in ``eval/results/``.
"""
