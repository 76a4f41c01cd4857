"""The version of vitslim (also in pyproject.toml)."""

__version__ = "0.1.0"
