"""Error types. User mistakes raise :class:`LmshrinkError` (a ``ValueError``) with a message that says what was
wrong and what is accepted; the CLI prints it on one line and exits non-zero, without a traceback."""

from __future__ import annotations


class LmshrinkError(ValueError):
    """A user-facing error: bad input, missing data, unusable file. The message is the whole explanation."""


class DataNotFoundError(LmshrinkError):
    """A corpus could not be found in any of the places that were tried."""


class ModelLoadError(LmshrinkError):
    """A model spec could not be resolved or its files could not be read."""


class CorruptFileError(LmshrinkError):
    """A file exists but is truncated, tampered with or not of the declared format."""


class NumericsError(LmshrinkError):
    """NaN or Inf found in weights, activations or losses (the message names the layer)."""
