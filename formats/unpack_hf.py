"""Independent readers of GPTQ, AWQ and compressed-tensors checkpoints, written from the formats' specs.

They share no code with the packers in `formats/gptq.py`, `formats/awq.py` and
`formats/compressed_tensors.py` (and use a different technique: the packers build bit streams
with `numpy.packbits`; these readers cut fields out of 64-bit windows of the int32 words), so a
packing bug cannot hide behind the same bug in the reader. `verify` compares their output bit for
bit with the record's dequantized weights.

Layouts read (research/formats.md §1–§3; K = in_features, N = out_features, b = bits, G = group):

- GPTQ v1 (`checkpoint_format: gptq`): `qweight` int32 `[K·b/32, N]`, each column a dense
  LSB-first b-bit stream along K; `qzeros` int32 `[K/G, N·b/32]`, each row a stream along N holding
  `z − 1`; `scales` fp16 `[K/G, N]`; `g_idx` int32 `[K]`.
  `W[n, k] = s[g_idx[k], n] · (q[k, n] − z[g_idx[k], n])`. With `sym: true` readers such as vLLM
  ignore `qzeros` and use `z = 2^(b−1)`, so the stored zeros must say exactly that.
- AWQ GEMM: `qweight` int32 `[K, N/8]`, nibble i (bits 4i..4i+3) of word c holds column
  `8c + [0, 2, 4, 6, 1, 3, 5, 7][i]`; `qzeros` int32 `[K/G, N/8]` the same way, storing `z`;
  `scales` fp16 `[K/G, N]`. `W[n, k] = s[k//G, n] · (q[k, n] − z[k//G, n])`.
- compressed-tensors `pack-quantized`: `weight_packed` int32 `[N, ceil(K·b/32)]`, each row a
  dense LSB-first stream of unsigned fields along K; `weight_scale` `[N, K/G]` (`[N, 1]` per
  channel); `weight_zero_point` int32 `[ceil(N·b/32), K/G]`, each column a stream along N (asym
  only; sym ⇒ `z = 2^(b−1)`); `weight_shape` int64 `(N, K)`. `W[n, k] = s[n, k//G] · (u[n, k] − z[n, k//G])`.

Every weight is evaluated as `float32(s) · (float32(q) − float32(z))`, the formula the record's
`affine` grid defines (exact in float32).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from lfq_export.errors import VerificationError

__all__ = [
    "HFCheckpoint",
    "open_checkpoint",
    "read_bitfields",
    "unpack_gptq",
    "unpack_awq",
    "unpack_compressed_tensors",
    "unpack_checkpoint",
    "unpack_module",
    "quantized_modules",
    "iter_unpacked",
]

_AWQ_NIBBLE_TO_COLUMN = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass
class HFCheckpoint:
    """A Hugging Face model directory opened for reading: config and tensor name → file."""

    path: Path
    config: dict[str, Any]
    files: dict[str, Path]  # tensor name → safetensors file
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    @property
    def quantization_config(self) -> dict[str, Any]:
        return dict(self.config.get("quantization_config") or {})

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as numpy (bf16 tensors are widened to float32 exactly)."""
        if name not in self.files:
            raise VerificationError(f"{self.path}: tensor {name} is missing")
        f = self._handles.get(self.files[name])
        if f is None:
            f = self._handles[self.files[name]] = safe_open(str(self.files[name]), framework="pt", device="cpu")
        t = f.get_tensor(name)
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        return t.numpy()

    def names(self) -> list[str]:
        return sorted(self.files)


def open_checkpoint(path: Path | str) -> HFCheckpoint:
    """Read `config.json` and map every tensor to its shard (via the index when sharded)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise VerificationError(f"{path}: no config.json")
    config = json.loads(cfg_file.read_text())
    index = path / "model.safetensors.index.json"
    files: dict[str, Path] = {}
    if index.is_file():
        for name, fname in json.loads(index.read_text())["weight_map"].items():
            files[name] = path / fname
    else:
        single = path / "model.safetensors"
        if not single.is_file():
            raise VerificationError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
        with safe_open(str(single), framework="pt", device="cpu") as f:
            files = {k: single for k in f.keys()}
    return HFCheckpoint(path, config, files)


# ---- bit fields ------------------------------------------------------------------------------
def read_bitfields(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Fields `0..count−1` of the dense LSB-first bit streams in the last axis of int32 `words`.

    Field i starts at bit `i·bits`: word `i·bits // 32`, shift `i·bits % 32`; a field that straddles
    two words takes its high bits from the next word. Returns int64 `[..., count]`."""
    w = words.astype(np.int64) & 0xFFFFFFFF  # the unsigned value of each 32-bit word
    pad = np.zeros(w.shape[:-1] + (1,), dtype=np.int64)
    w = np.concatenate([w, pad], axis=-1)
    start = np.arange(count, dtype=np.int64) * bits
    lo, shift = start // 32, start % 32
    if int(lo.max(initial=0)) >= words.shape[-1]:
        raise VerificationError(f"packed stream of {words.shape[-1]} words is too short for {count} {bits}-bit fields")
    window = w[..., lo] | (w[..., lo + 1] << 32)  # 64-bit window, fits: both halves < 2^32
    return (window >> shift) & ((1 << bits) - 1)


def _affine(scale: np.ndarray, code: np.ndarray, zero: np.ndarray) -> torch.Tensor:
    """`float32(s) · (float32(q) − float32(z))`, elementwise on equally shaped arrays."""
    s = scale.astype(np.float32)
    return torch.from_numpy(s * (code.astype(np.float32) - zero.astype(np.float32)))


# ---- GPTQ --------------------------------------------------------------------------------------
def unpack_gptq(ck: HFCheckpoint, module: str) -> torch.Tensor:
    """The float32 weight `[N, K]` of one GPTQ v1 module."""
    qc = ck.quantization_config
    bits = int(qc["bits"])
    if qc.get("checkpoint_format", qc.get("format", "gptq")) != "gptq":
        raise VerificationError(f"{ck.path}: only GPTQ v1 (checkpoint_format gptq) is read here")
    qweight = ck.tensor(f"{module}.qweight")
    qzeros = ck.tensor(f"{module}.qzeros")
    scales = ck.tensor(f"{module}.scales")
    g_idx = ck.tensor(f"{module}.g_idx").astype(np.int64)
    k, n = g_idx.shape[0], scales.shape[1]
    if qweight.dtype != np.int32 or qzeros.dtype != np.int32 or scales.dtype != np.float16:
        raise VerificationError(f"{module}: GPTQ tensors must be int32/int32/float16")
    codes = read_bitfields(np.ascontiguousarray(qweight.T), bits, k).T  # [K, N]
    stored = read_bitfields(qzeros, bits, n)  # [K/G, N], v1: z − 1
    if (stored == (1 << bits) - 1).any():
        raise VerificationError(f"{module}: a v1 qzeros field holds 2^b−1 (zero point 0), which readers disagree on")
    zeros = stored + 1
    if qc.get("sym") and not (zeros == 1 << (bits - 1)).all():
        raise VerificationError(f"{module}: sym is true but qzeros are not 2^(b−1) (vLLM would ignore them)")
    w = _affine(scales[g_idx], codes, zeros[g_idx])  # [K, N]
    return w.T.contiguous()


# ---- AWQ ---------------------------------------------------------------------------------------
def _awq_columns(packed: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit values `[R, N]` of AWQ-ordered int32 words `[R, N/8]`."""
    w = packed.astype(np.int64) & 0xFFFFFFFF
    rows, blocks = w.shape
    out = np.empty((rows, blocks, 8), dtype=np.int64)
    for nibble, column in enumerate(_AWQ_NIBBLE_TO_COLUMN):
        out[:, :, column] = (w >> (4 * nibble)) & 0xF
    return out.reshape(rows, blocks * 8)


def unpack_awq(ck: HFCheckpoint, module: str) -> torch.Tensor:
    """The float32 weight `[N, K]` of one AWQ GEMM module."""
    qc = ck.quantization_config
    if int(qc.get("bits", qc.get("w_bit", 0))) != 4 or str(qc.get("version", "gemm")).lower() != "gemm":
        raise VerificationError(f"{ck.path}: only 4-bit AWQ GEMM is read here")
    if not qc.get("zero_point", False):
        raise VerificationError(f"{ck.path}: AWQ without zero_point is not a layout loaders agree on")
    qweight = ck.tensor(f"{module}.qweight")
    qzeros = ck.tensor(f"{module}.qzeros")
    scales = ck.tensor(f"{module}.scales")
    if scales.dtype != np.float16:
        raise VerificationError(f"{module}: AWQ scales must be float16")
    codes = _awq_columns(qweight)  # [K, N]
    zeros = _awq_columns(qzeros)  # [K/G, N]
    k, ng = codes.shape[0], scales.shape[0]
    g = int(qc.get("group_size", qc.get("q_group_size", -1)))
    g = k if g <= 0 else g
    if ng * g != k:
        raise VerificationError(f"{module}: {ng} scale rows × group {g} ≠ in_features {k}")
    rows = np.arange(k) // g
    return _affine(scales[rows], codes, zeros[rows]).T.contiguous()


# ---- compressed-tensors ------------------------------------------------------------------------
def _ct_weight_args(qc: dict[str, Any]) -> dict[str, Any]:
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise VerificationError("compressed-tensors: expected exactly one config group")
    if qc.get("format") != "pack-quantized" or qc.get("quantization_status") != "compressed":
        raise VerificationError("compressed-tensors: only compressed pack-quantized checkpoints are read here")
    return dict(groups[0]["weights"])


def unpack_compressed_tensors(ck: HFCheckpoint, module: str) -> torch.Tensor:
    """The float32 weight `[N, K]` of one compressed-tensors pack-quantized module."""
    args = _ct_weight_args(ck.quantization_config)
    bits = int(args["num_bits"])
    n, k = (int(v) for v in ck.tensor(f"{module}.weight_shape"))
    packed = ck.tensor(f"{module}.weight_packed")
    scale = ck.tensor(f"{module}.weight_scale")  # [N, K/G]
    if packed.dtype != np.int32:
        raise VerificationError(f"{module}: weight_packed must be int32")
    codes = read_bitfields(packed, bits, k)  # [N, K]
    ng = scale.shape[1]
    if args.get("symmetric", True):
        zeros = np.full((n, ng), 1 << (bits - 1), dtype=np.int64)
    else:
        zp = ck.tensor(f"{module}.weight_zero_point")  # [ceil(N·b/32), K/G]
        zeros = read_bitfields(np.ascontiguousarray(zp.T), bits, n).T  # [N, K/G]
    g = k // ng
    if ng * g != k or (args.get("strategy") == "group" and int(args["group_size"]) != g):
        raise VerificationError(f"{module}: scale shape {scale.shape} does not match K={k} and the config's group")
    cols = np.arange(k) // g
    return _affine(scale[:, cols], codes, zeros[:, cols])


# ---- whole checkpoints -------------------------------------------------------------------------
_SUFFIXES = {
    "gptq": ".qweight",
    "awq": ".qweight",
    "compressed-tensors": ".weight_packed",
}
_UNPACKERS = {"gptq": unpack_gptq, "awq": unpack_awq, "compressed-tensors": unpack_compressed_tensors}
_AUX = {
    "gptq": (".qweight", ".qzeros", ".scales", ".g_idx"),
    "awq": (".qweight", ".qzeros", ".scales"),
    "compressed-tensors": (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx"),
}


def _method(ck: HFCheckpoint) -> str:
    method = ck.quantization_config.get("quant_method")
    if method not in _UNPACKERS:
        raise VerificationError(f"{ck.path}: quant_method {method!r} is not one of {sorted(_UNPACKERS)}")
    return method


def quantized_modules(ck: HFCheckpoint) -> list[str]:
    suffix = _SUFFIXES[_method(ck)]
    return sorted(n[: -len(suffix)] for n in ck.names() if n.endswith(suffix))


def unpack_module(ck: HFCheckpoint, module: str) -> torch.Tensor:
    return _UNPACKERS[_method(ck)](ck, module)


def iter_unpacked(ck: HFCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """(tensor name, float32 tensor) for every weight: quantized modules dequantized, the rest widened."""
    method = _method(ck)
    mods = quantized_modules(ck)
    aux = {m + s for m in mods for s in _AUX[method]}
    for m in mods:
        yield f"{m}.weight", unpack_module(ck, m)
    for name in ck.names():
        if name not in aux:
            yield name, torch.from_numpy(ck.tensor(name).astype(np.float32))


def unpack_checkpoint(path: Path | str) -> dict[str, torch.Tensor]:
    """Every weight of a GPTQ / AWQ / compressed-tensors directory as float32, by HF tensor name."""
    return dict(iter_unpacked(open_checkpoint(path)))
