"""User-facing errors.

Anything a user can cause (a bad path, an unknown class, a malformed checkpoint) raises an
`ArgenError` with a message that fits on one line. The CLI prints it and exits with code 2;
library users catch it like any other `ValueError`.
"""


class ArgenError(ValueError):
    """An error caused by input the user gave; the message says what to fix."""


class CheckpointError(ArgenError):
    """A weights file or state dict that cannot be loaded into the model asked for."""


class DatasetError(ArgenError):
    """A dataset that is missing, truncated or in the wrong format."""
