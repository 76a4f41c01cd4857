"""Every error a user can cause (bad input, files, options): the CLI prints them as one line.

This module is the bottom of the package: it imports nothing from vitslim, and every other
module raises these. Anything that is not a ``VitslimError`` is a bug in vitslim and the CLI
shows its traceback. Each class also derives from the built-in error it used to be, so
``except ValueError`` around older code keeps working.
"""


class VitslimError(Exception):
    """Base of all errors caused by what the user gave vitslim; the message says what to do."""


class ConfigError(VitslimError, ValueError):
    """An option, recipe or config value is invalid; the message lists the valid ones."""


class DataError(VitslimError, ValueError):
    """The image folder cannot be used as given; the message says why and what to do."""


class BadImageError(DataError):
    """An image file cannot be decoded (or is not a regular file, or is too large)."""


class ModelLoadError(VitslimError, RuntimeError):
    """A model could not be loaded; the message says what to do."""


class UnsupportedModelError(VitslimError, TypeError):
    """The model's architecture has no vitslim adapter (yet)."""


class ReferenceUnavailable(VitslimError, RuntimeError):
    """The reference model could not be built (no registry access, no cached file)."""


class ExportError(VitslimError, RuntimeError):
    """The model could not be exported; the message names the operation."""


class CalibrationError(VitslimError, ValueError):
    """Calibration data cannot set a quantizer's range (none seen, or NaN/Inf)."""


class NonFiniteOutputError(VitslimError, ValueError):
    """A model produced NaN or Inf: reported as an error, never turned into a metric."""


class OutputPathError(VitslimError, OSError):
    """An output path cannot be written (not writable, or a folder where a file is expected)."""


EXPECTED_ERRORS = (VitslimError,)
