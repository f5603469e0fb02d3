"""The shape world: synthetic scenes and videos of coloured shapes with exact ground truth, the tiny
LLaVA / Qwen2-VL / CLIP models trained on it (``shipped``: they ship in ``models/``), and the code that
trains and diagnoses them (``train_tiny``, ``train_clip``, ``objectives``, ``video_targets``,
``heldout``, ``diagnose``). docs/training.md has the commands and every measurement."""
