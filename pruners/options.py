"""Pruner options, declared: each pruner lists its options with a type, the values they accept, a default
and a line of help. ``Plan.parse`` checks every option value against the declaration (before any work);
``tokensieve pruners`` prints them; a pruner reads a value with ``Pruner.option(options, name)``.

    OPTIONS = {"tau": Option("float", "cut between segments below this similarity", 0.9, low=-1, high=1)}
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..engine.errors import PlanError

TYPES = ("int", "float", "bool", "str", "ints", "floats", "strs")


@dataclass(frozen=True)
class Option:
    """type: one of TYPES ("ints" / "floats" / "strs": a list, written a/b/c in a plan string; one value is a
    list of one); low / high: inclusive bounds of numbers; choices: the accepted values; length: a list's
    required length; check: a further check of the value (raises PlanError), e.g. that a name is registered."""

    type: str
    help: str
    default: Any = None
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    length: int | None = None
    check: Callable[[Any, str], None] | None = None

    def validate(self, value, label: str) -> Any:
        """The value, normalised (an int where a float is asked becomes a float; one value where a list is
        asked becomes a list of one). Raises PlanError naming ``label`` (e.g. "stage 0 (fastvid): tau")."""
        if self.type in ("ints", "floats", "strs"):
            items = value if isinstance(value, (list, tuple)) else [value]
            if self.type == "strs" and isinstance(value, str):
                items = [v.strip() for v in value.split("/")] if "/" in value else [value]
            out = [_scalar(self.type[:-1], v, label, self) for v in items]
            if not out or (self.length is not None and len(out) != self.length):
                n = f"{self.length} values" if self.length else "at least one value"
                raise PlanError(f"{label} takes {n} ({_form(self)}), got {value!r}")
        else:
            out = _scalar(self.type, value, label, self)
        if self.check is not None:
            self.check(out, label)
        return out

    def describe(self) -> str:
        """One line: the accepted values, the default and the help ("int >= 1, default 8: ...")."""
        default = "none" if self.default is None else _show(self.default)
        return f"{_form(self)}, default {default}: {self.help}"


def _scalar(kind: str, v, label: str, opt: Option):
    ok = {"int": isinstance(v, int) and not isinstance(v, bool),
          "float": isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": isinstance(v, bool),
          "str": isinstance(v, str) and v != ""}[kind]
    if not ok:
        raise PlanError(f"{label} must be {_form(opt)}, got {v!r}")
    if kind == "float":
        v = float(v)
        if not math.isfinite(v):
            raise PlanError(f"{label} must be a finite number, got {v!r}")
    if kind in ("int", "float") and ((opt.low is not None and v < opt.low) or (opt.high is not None and v > opt.high)):
        raise PlanError(f"{label} must be {_form(opt)}, got {v!r}")
    if opt.choices is not None and v not in opt.choices:
        raise PlanError(f"{label} must be one of {', '.join(map(str, opt.choices))}, got {v!r}")
    return v


def _form(opt: Option) -> str:
    """How the accepted values read: "a float in [0, 1]", "an int >= 1", "representative or distinct"."""
    if opt.choices is not None:
        return " or ".join(map(str, opt.choices))
    listed = opt.type in ("ints", "floats", "strs")
    kind = opt.type[:-1] if listed else opt.type
    name = ({"int": "ints", "float": "numbers", "str": "texts"} if listed else
            {"int": "an int", "float": "a number", "bool": "true or false", "str": "a text"})[kind]
    if opt.low is not None and opt.high is not None:
        name += f" in [{_show(opt.low)}, {_show(opt.high)}]"
    elif opt.low is not None:
        name += f" >= {_show(opt.low)}"
    elif opt.high is not None:
        name += f" <= {_show(opt.high)}"
    if listed:
        name = f"{opt.length or 'one or more'} {name}, written a/b/c"
    return name


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return "/".join(_show(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
