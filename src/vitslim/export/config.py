"""``ExportConfig``: the last step of a recipe, the format the compressed model is saved in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vitslim.datafile import brief
from vitslim.errors import ConfigError
from vitslim.registry import register

RUNTIMES = ("onnxruntime", "openvino")
OPENVINO_PRECISIONS = ("bf16", "f32")


@dataclass(frozen=True)
class ExportConfig:
    """Save the model as an ONNX file (``vitslim.export.export_onnx``) instead of a PyTorch
    folder, for ``runtime``: ONNX Runtime (int8 linears as its contrib kernels) or OpenVINO
    (standard Q/DQ ops, run with the float ``precision`` hint ``bf16`` or ``f32``). It changes
    the artifact's format, not the model: no verb."""

    format: str = "onnx"
    runtime: str = "onnxruntime"
    precision: str | None = None  # OpenVINO's inference precision hint for the float parts

    def __post_init__(self) -> None:
        if self.format != "onnx":
            raise ConfigError(f"format {brief(self.format)} is not supported; use 'onnx'")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime {brief(self.runtime)} is not one of {list(RUNTIMES)}")
        if self.runtime == "openvino" and self.precision not in OPENVINO_PRECISIONS:
            raise ConfigError(f"runtime 'openvino' needs precision {' or '.join(OPENVINO_PRECISIONS)} (the hint for "
                              f"its float parts), got {brief(self.precision)}")
        if self.runtime != "openvino" and self.precision is not None:
            raise ConfigError(f"precision is OpenVINO's hint; runtime {brief(self.runtime)} takes none")

    @property
    def label(self) -> str:
        """The runtime as reports name it: ``onnxruntime``, ``openvino-bf16``, ``openvino-f32``."""
        return self.runtime if self.precision is None else f"{self.runtime}-{self.precision}"


register(ExportConfig, step="export", stage=3)(None)


def export_step(steps: Iterable[Any]) -> ExportConfig:
    """A recipe's export step (the runtime its ONNX file is written for); ONNX Runtime's when it has none."""
    return next((s for s in steps if isinstance(s, ExportConfig)), ExportConfig())
