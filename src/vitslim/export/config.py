"""``ExportConfig``: the last step of a recipe, the format the compressed model is saved in."""

from __future__ import annotations

from dataclasses import dataclass

from vitslim.datafile import brief
from vitslim.errors import ConfigError
from vitslim.registry import register


@dataclass(frozen=True)
class ExportConfig:
    """Save the model as an ONNX file for ONNX Runtime (``vitslim.export.export_onnx``) instead
    of a PyTorch folder. It changes the artifact's format, not the model: no verb."""

    format: str = "onnx"

    def __post_init__(self) -> None:
        if self.format != "onnx":
            raise ConfigError(f"format {brief(self.format)} is not supported; use 'onnx'")


register(ExportConfig, step="export", stage=3)(None)
