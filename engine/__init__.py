"""The engine core: plans, adapters, hooks, the generate path."""
from .engine import Engine, Result
from .errors import InputError, PlanError, TokenSieveError, UnsupportedModelError
from .plan import Plan, Stage
from .request import Request

__all__ = ["Engine", "Result", "Plan", "Stage", "Request", "TokenSieveError", "PlanError", "InputError",
           "UnsupportedModelError"]
