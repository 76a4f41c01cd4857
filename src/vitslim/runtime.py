"""ONNX Runtime as a model: an ``.onnx`` file opened in a session, called like a PyTorch module."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort
import torch

from vitslim.errors import ModelLoadError

if TYPE_CHECKING:
    from vitslim.artifact.contract import Contract


class OnnxModel:
    """An ONNX Runtime session used like a model: takes a float tensor, returns a tensor.
    ``contract`` is the vitslim contract the file carries (``vitslim.load`` reads and checks it)."""

    def __init__(self, path: str | Path, threads: int | None = None, contract: Contract | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"ONNX model {str(self.path)!r} does not exist or is not a file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # shape-inference warnings of exported graphs are noise here
        self.threads = opts.intra_op_num_threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT reports bad files as several exception types
            raise ModelLoadError(f"ONNX Runtime cannot load {str(self.path)!r} ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())[:200]}); is it a complete .onnx file?") from None
        if len(self.session.get_inputs()) != 1 or len(self.session.get_inputs()[0].shape) != 4:
            raise ModelLoadError(f"ONNX model {str(self.path)!r} does not take one (batch, channels, height, "
                                 "width) image input, as an exported vision model does")
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        dims = graph_input.shape[1:]
        # (C, H, W) from the graph when static; 224x224 RGB when the export left it dynamic.
        self.input_size = tuple(dims) if all(isinstance(d, int) for d in dims) else (3, 224, 224)
        self.output_shape = tuple(self.session.get_outputs()[0].shape)
        self.contract = contract
        # Without a vitslim contract, a 1000-wide output is taken as ImageNet logits.
        imagenet_head = 1000 if self.output_shape and self.output_shape[-1] == 1000 else 0
        self.num_classes = contract.num_classes if contract else imagenet_head

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        try:
            out = self.session.run(None, {self.input_name: images.float().numpy()})[0]
        except Exception as err:  # e.g. images of another size than the graph takes
            raise ModelLoadError(f"ONNX Runtime cannot run {str(self.path)!r} on images of shape "
                                 f"{tuple(images.shape)} ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
                                 "does it take this input size?") from None
        return torch.from_numpy(out)
