"""Errors raised by tsa-patch. Each message says what is wrong, the value, and the fix, in one sentence.

The CLI prints a ``TsaError`` as one red line on stderr and exits with status 1 (the traceback appears only
with ``TSA_DEBUG=1``).
"""


class TsaError(Exception):
    """Base class of every error tsa-patch reports to a user."""


class ModelNotFoundError(TsaError):
    """The model spec is neither a local folder, a GGUF file, nor a hub id available offline."""


class UnsupportedModelError(TsaError):
    """The model's architecture has no Token Sparse Attention integration."""


class PolicyError(TsaError):
    """A policy file is missing, unreadable, malformed or out of range, or does not fit the model."""


class DataError(TsaError):
    """Calibration data cannot be read or yields no usable sample."""


class OutputExistsError(TsaError):
    """The output folder cannot take the export: it is a file, not empty, not a previous export (with
    ``--overwrite``), the source model or a folder holding it, or it changed while the export was written."""


class ExportInterrupted(TsaError):
    """SIGINT, SIGTERM or SIGHUP arrived during an export; the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum
