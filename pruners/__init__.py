"""The pruner registry: name -> class. Adding a method is one file, one entry here, one test."""
from ..engine.errors import PlanError
from .base import (Pruner, Selection, StageInput, TowerRecord, cls_or_surrogate, keys_or_tokens,
                   topk_sorted)
from .aim import AIMPruner
from .cdpruner import CDPrunerPruner
from .cls import ClsPruner
from .dart import DARTPruner
from .divprune import DivPrunePruner
from .dycoke import DyCokePruner
from .fastv import FastVPruner
from .fastvid import FastVIDPruner
from .feather import FeatherPruner
from .flowcut import FlowCutPruner
from .holitom import HoliTomPruner
from .holitom_llm import HoliTomLLMPruner
from .framefusion import FrameFusionPruner
from .keyscore import KeyScorePruner
from .mmtok import MMTokPruner
from .pool import PoolPruner
from .priority import PriorityPruner
from .prumerge import PruMergePruner
from .prunevid import PruneVidPruner
from .quota import QuotaPruner
from .random import RandomPruner
from .rollout import RolloutPruner
from .sparsevlm import SparseVLMPruner
from .tome import ToMePruner
from .uniform import UniformPruner
from .vidcom2 import VidCom2Pruner
from .visionzip import VisionZipPruner
from .vispruner import VisPrunerPruner

REGISTRY: dict[str, type[Pruner]] = {
    "random": RandomPruner,
    "uniform": UniformPruner,
    "pool": PoolPruner,
    "fastv": FastVPruner,
    "cls": ClsPruner,
    "visionzip": VisionZipPruner,
    "vispruner": VisPrunerPruner,
    "cdpruner": CDPrunerPruner,
    "mmtok": MMTokPruner,
    "prumerge": PruMergePruner,
    "tome": ToMePruner,
    "divprune": DivPrunePruner,
    "flowcut": FlowCutPruner,
    "rollout": RolloutPruner,
    "sparsevlm": SparseVLMPruner,
    "feather": FeatherPruner,
    "aim": AIMPruner,
    "quota": QuotaPruner,
    "keyscore": KeyScorePruner,
    "dycoke": DyCokePruner,
    "fastvid": FastVIDPruner,
    "vidcom2": VidCom2Pruner,
    "holitom": HoliTomPruner,
    "holitom_llm": HoliTomLLMPruner,
    "prunevid": PruneVidPruner,
    "framefusion": FrameFusionPruner,
    "priority": PriorityPruner,
    "dart": DARTPruner,
}


def get_pruner(name: str, stage_label: str = "stage") -> Pruner:
    """An instance of the named pruner; PlanError listing the known names if there is none."""
    try:
        return REGISTRY[name]()
    except KeyError:
        raise PlanError(f"{stage_label}: unknown pruner '{name}'; known: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["Pruner", "Selection", "StageInput", "TowerRecord", "REGISTRY", "get_pruner", "topk_sorted",
           "cls_or_surrogate", "keys_or_tokens"]
