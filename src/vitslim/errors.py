"""The errors vitslim raises for bad input: the CLI prints them as one line, no traceback."""

from vitslim.data import DataError
from vitslim.models.adapter import UnsupportedModelError
from vitslim.models.loading import ModelLoadError
from vitslim.models.reference import ReferenceUnavailable


class ConfigError(ValueError):
    """An option or config value is invalid; the message lists the valid ones."""


EXPECTED_ERRORS = (DataError, ModelLoadError, UnsupportedModelError, ReferenceUnavailable,
                   ConfigError, FileNotFoundError)
