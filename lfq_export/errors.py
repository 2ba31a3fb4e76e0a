"""Typed errors. Anything a user or an input file can cause raises an `LfqError`;
the CLI catches the base class and prints one clean line (no traceback unless --debug)."""

from __future__ import annotations

__all__ = [
    "LfqError",
    "InputError",
    "SchemeError",
    "FormatError",
    "RecordError",
    "CalibrationError",
    "OptimisationError",
    "VerificationError",
    "OutputError",
]


class LfqError(ValueError):
    """Base of every user-facing error: the message is one line that names the problem and the fix."""


class InputError(LfqError):
    """The model input is unusable (missing, corrupt, unsupported, unsafe)."""


class SchemeError(LfqError):
    """A scheme, grid or group size that cannot be applied to this model or format."""


class FormatError(LfqError):
    """An export format that cannot hold the record exactly, or an unknown format."""


class RecordError(LfqError):
    """A run directory that is missing, incomplete, corrupt or from another version."""


class CalibrationError(LfqError):
    """Calibration input missing, empty, too short or malformed."""


class OptimisationError(LfqError):
    """The optimiser produced NaN/Inf; finished blocks are kept and the run can resume."""


class VerificationError(LfqError):
    """An exported file does not match the run it is verified against."""


class OutputError(LfqError):
    """The output path exists, is not writable, or the disk filled up while writing."""
