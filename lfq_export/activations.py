"""Activation stores: the calibration set's hidden states at one block boundary.

Block-wise PTQ keeps, for the block being optimised, the FP-trajectory input and target and the
quantized-trajectory input: three `[nsamples, seqlen, hidden]` tensors. For large models these can
be kept in bf16 (`--act-dtype bfloat16`) or memory-mapped on disk (`--offload-dir`).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import torch

__all__ = ["ActivationStore"]


class ActivationStore:
    """`[n, seqlen, hidden]` activations in RAM (fp32/bf16) or in a disk memmap."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype = torch.float32, offload_dir: Path | None = None):
        self.shape = shape
        self.dtype = dtype
        self._path: Path | None = None
        if offload_dir is None:
            self._data = torch.empty(shape, dtype=dtype)
        else:
            offload_dir = Path(offload_dir)
            offload_dir.mkdir(parents=True, exist_ok=True)
            self._path = offload_dir / f"act-{uuid.uuid4().hex[:8]}.bin"
            np_dtype = np.float32 if dtype == torch.float32 else np.uint16  # bf16 stored as raw 16-bit
            self._mm = np.memmap(self._path, dtype=np_dtype, mode="w+", shape=shape)
            self._data = torch.from_numpy(self._mm)

    def __len__(self) -> int:
        return self.shape[0]

    def get(self, idx: slice | torch.Tensor | list[int]) -> torch.Tensor:
        """Rows `idx` as float32."""
        x = self._data[idx]
        if self._path is not None and self.dtype == torch.bfloat16:
            x = x.view(torch.bfloat16)
        return x.to(torch.float32)

    def set(self, idx: slice, value: torch.Tensor) -> None:
        v = value.detach().to(self.dtype)
        if self._path is not None and self.dtype == torch.bfloat16:
            v = v.view(torch.uint16) if hasattr(torch, "uint16") else v.view(torch.int16)
        self._data[idx] = v

    def close(self) -> None:
        if self._path is not None:
            del self._data
            del self._mm
            self._path.unlink(missing_ok=True)
            self._path = None
