"""The errors tokensieve raises for bad input: one clear message, raised before any model work."""


class TokenSieveError(ValueError):
    """Base class of every error tokensieve raises for bad input."""


class PlanError(TokenSieveError):
    """A plan (or one of its stages) is malformed or does not fit the model/request."""


class InputError(TokenSieveError):
    """A request's prompt, images or video cannot be used."""


class UnsupportedModelError(TokenSieveError):
    """The model's family has no adapter."""
