"""Exceptions raised by the sae package, so callers can catch bad input separately from bugs."""


class SAEError(Exception):
    """Base class: every error this package raises on purpose derives from it."""


class SAEConfigError(SAEError, ValueError):
    """A setting is invalid; the message says what was given and what is allowed."""


class SAEDataError(SAEError, ValueError):
    """The activations (or gradients) are unusable: wrong width, NaN/inf, too few tokens."""


class SAETrainingError(SAEError, RuntimeError):
    """Training diverged (non-finite loss or gradients); the message names the step."""
