"""The errors tokensieve raises for bad input: one clear message, raised before any model work."""
import re


class TokenSieveError(ValueError):
    """Base class of every error tokensieve raises for bad input."""


class PlanError(TokenSieveError):
    """A plan (or one of its stages) is malformed or does not fit the model/request."""


class InputError(TokenSieveError):
    """A request's prompt, images or video cannot be used."""


class UnsupportedModelError(TokenSieveError):
    """The model's family has no adapter."""


def named(i: int, n: int, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; in a batch of ``n`` > 1 requests, its errors name request ``i`` first."""
    try:
        return fn(*args, **kwargs)
    except TokenSieveError as e:
        if n > 1 and not re.match(r"request \d+: ", str(e)):
            raise type(e)(f"request {i}: {e}") from None
        raise
