"""Export to ONNX Runtime: ``export_onnx`` writes the file (see ``vitslim.export.onnx`` for
what runs in integer and what stays float); ``ExportConfig`` is a recipe's export step."""

from vitslim.errors import ExportError
from vitslim.export.config import ExportConfig
from vitslim.export.onnx import export_mode, export_onnx, integer_ops, store_int8_weights, validate_onnx

__all__ = ["ExportConfig", "ExportError", "export_mode", "export_onnx", "integer_ops", "store_int8_weights",
           "validate_onnx"]
