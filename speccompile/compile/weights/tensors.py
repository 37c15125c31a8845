"""Reading a checkpoint's tensors by name, with errors that name the missing or misshapen tensor."""
from __future__ import annotations

import numpy as np

from speccompile.errors import CheckpointError


class TensorReader:
    def __init__(self, tensors: dict[str, np.ndarray], prefix: str = ""):
        self.tensors, self.prefix = tensors, prefix

    def has(self, name: str) -> bool:
        return self.prefix + name in self.tensors

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        key = self.prefix + name
        if key not in self.tensors:
            raise CheckpointError(f"checkpoint is missing tensor {key!r}")
        arr = np.asarray(self.tensors[key], np.float32)
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"tensor {key!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        return arr
