"""Independent reader of the MatMulNBits weights in an exported `model.onnx`.

Written from the operator specification (onnxruntime `docs/ContribOperators.md`,
`com.microsoft.MatMulNBits`), sharing no code with the packer (`onnx_pack`): the packer ORs shifted
codes into bytes, this reader expands every byte into its bit stream (least significant bit first)
and regroups the stream into `bits`-wide integers. Spec points used:

- `B` is `[N, n_blocks_per_col, blob_size]` with `blob_size = block_size·bits/8`; within a block the
  values are a little-endian bit stream along K; elements past K in the last block are padding.
- `scales` has `N·n_blocks_per_col` elements in the type of `A`.
- `zero_points` is uint8 with `N·ceil(n_blocks_per_col·bits/8)` elements packed the same way per
  row, or has the type of `A` with `N·n_blocks_per_col` elements; absent means `2^(bits−1)`.
- The weight is `(q − zero_point) · scale`, float32 here.

The mapping node → HF module names (several linears fused along N) is the model's metadata entry
`lfq_export.linears`; nodes without an entry are reported under their node name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["LINEARS_METADATA_KEY", "iter_matmulnbits", "read_matmulnbits", "dequantize_node", "read_initializers"]

LINEARS_METADATA_KEY = "lfq_export.linears"


def _bitstream_ints(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` unsigned `bits`-wide integers of a little-endian bit stream, per row."""
    stream = np.unpackbits(data.astype(np.uint8), axis=-1, bitorder="little")
    stream = stream[..., : count * bits].reshape(data.shape[:-1] + (count, bits))
    value = np.zeros(stream.shape[:-1], np.uint8)  # bits ≤ 8: every value fits a byte
    for i in range(bits):
        value |= stream[..., i] << np.uint8(i)
    return value


def dequantize_node(attrs: dict, b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None) -> np.ndarray:
    """The float32 weight `[N, K]` that one MatMulNBits node multiplies by."""
    n, k, bits, block = int(attrs["N"]), int(attrs["K"]), int(attrs["bits"]), int(attrs["block_size"])
    n_blocks = (k + block - 1) // block
    b = b.reshape(n, n_blocks, -1)
    q = _bitstream_ints(b, bits, block).reshape(n, n_blocks * block)[:, :k]  # drop padding
    s = scales.astype(np.float32).reshape(n, n_blocks)
    if zero_points is None:
        z = np.full((n, n_blocks), 2 ** (bits - 1), np.float32)
    elif zero_points.dtype == np.uint8:
        z = _bitstream_ints(zero_points.reshape(n, -1), bits, n_blocks).astype(np.float32)
    else:
        z = zero_points.astype(np.float32).reshape(n, n_blocks)
    block_of_k = np.arange(k) // block
    return ((q.astype(np.float32) - z[:, block_of_k]) * s[:, block_of_k]).astype(np.float32)


def iter_matmulnbits(model_path: Path | str, names: Iterable[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Per MatMulNBits node: HF module name → float32 weight `[out, in]` (one node in memory at a time)."""
    model = onnx.load(str(model_path), load_external_data=False)
    base = Path(model_path).parent
    meta = {p.key: p.value for p in model.metadata_props}
    mapping = json.loads(meta.get(LINEARS_METADATA_KEY, "{}"))
    inits = {t.name: t for t in model.graph.initializer}
    wanted = None if names is None else set(names)

    def tensor(name: str) -> np.ndarray | None:
        if not name:
            return None
        t = inits[name]
        if t.data_location == onnx.TensorProto.EXTERNAL:
            onnx.external_data_helper.load_external_data_for_tensor(t, str(base))
        return numpy_helper.to_array(t)

    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        rows = mapping.get(node.name) or [[node.name, 0, None]]
        if wanted is not None and not any(r[0] in wanted for r in rows):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        ins = list(node.input) + [""] * (4 - len(node.input))
        w = dequantize_node(attrs, tensor(ins[1]), tensor(ins[2]), tensor(ins[3]))
        yield {name: w[start:stop] for name, start, stop in rows if wanted is None or name in wanted}


def read_matmulnbits(model_path: Path | str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """HF module name → float32 weight `[out, in]` for every MatMulNBits in the model (or `names`)."""
    out: dict[str, np.ndarray] = {}
    for part in iter_matmulnbits(model_path, names):
        out.update(part)
    return out


def read_initializers(model_path: Path | str, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The initializers called `names` (those present), as numpy arrays."""
    model = onnx.load(str(model_path), load_external_data=False)
    base = Path(model_path).parent
    wanted = set(names)
    out = {}
    for t in model.graph.initializer:
        if t.name in wanted:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                onnx.external_data_helper.load_external_data_for_tensor(t, str(base))
            out[t.name] = numpy_helper.to_array(t)
    return out
