"""compressed-tensors `pack-quantized` checkpoints (W{2,4,8}A16 int, group or channel, sym or asym).

Per quantized linear `P` (K = in_features, N = out_features, b = bits, G = group, K per channel):

    P.weight_packed      int32 [N, ceil(K·b/32)]  unsigned codes u, each row a dense LSB-first
                                                  b-bit stream along K (zero-padded to a word)
    P.weight_scale       fp16  [N, K/G]           ([N, 1] per channel)
    P.weight_zero_point  int32 [ceil(N·b/32), K/G]  asym only: unsigned z, each column a stream along N
    P.weight_shape       int64 [2] = (N, K)
    P.bias               as in the record

`W[n, k] = s[n, k//G] · (u[n, k] − z[n, k//G])`, the `affine` grid exactly: compressed-tensors
quantizes signed values `q_s ∈ [−2^(b−1), 2^(b−1)−1]` with signed zero points and packs
`u = q_s + 2^(b−1)`, `z = zp_s + 2^(b−1)`, so the stored fields are our unsigned codes and zeros.
Symmetric means `zp_s = 0`, i.e. `z = 2^(b−1)` (vLLM's `uint4b8` …), and no zero tensor.

Only 2/4/8 bits: for 3/5/6/7 bits compressed-tensors ≥ 0.20 packs densely while ≤ 0.17 (the
version vLLM 0.33 pins) packs ⌊32/b⌋ fields per word, so one file cannot be right for both
(formats.md §3.2). Scales are fp16 and config.json says float16, which is the dtype both
transformers and vLLM then give the scales.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lfq_export.formats_api import register_format
from lfq_export.grids import AffineGrid, Grid
from lfq_export.record import QuantizedModel, QuantizedTensor

from .hf_checkpoint import HFExport, HFFormatAdapter, pack_bitstream, uniform_grid
from .unpack_hf import HFCheckpoint, unpack_compressed_tensors

__all__ = [
    "CompressedTensorsFormat",
    "CT_BITS",
    "CT_FORMAT_VERSION",
    "pack_compressed_tensors",
    "ct_quantization_config",
]

CT_BITS = (2, 4, 8)
#: the compressed-tensors release whose schema and packing this writer follows (2/4/8-bit packing
#: is identical in 0.17, the version vLLM 0.33 pins)
CT_FORMAT_VERSION = "0.20.0"
_CT_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
log = logging.getLogger(__name__)


def _pack_padded(values: np.ndarray, bits: int) -> np.ndarray:
    """Stream along the last axis, zero-padded to whole int32 words (`ceil(L·b/32)` words)."""
    per_word = 32 // bits
    pad = (-values.shape[-1]) % per_word
    if pad:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (pad,), dtype=values.dtype)], axis=-1)
    return pack_bitstream(values, bits)


def pack_compressed_tensors(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one quantized linear (names relative to the module)."""
    grid = qt.grid
    assert isinstance(grid, AffineGrid)
    n, k = qt.shape
    out = {
        "weight_packed": torch.from_numpy(_pack_padded(qt.codes.numpy(), grid.bit_width)),  # [N, ceil(K·b/32)]
        "weight_scale": qt.params["scale"].contiguous(),  # fp16 [N, K/G]
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not grid.sym:
        zp = _pack_padded(np.ascontiguousarray(qt.params["zero"].numpy().T), grid.bit_width)  # [K/G, ceil(N·b/32)]
        out["weight_zero_point"] = torch.from_numpy(np.ascontiguousarray(zp.T))
    return out


def ct_quantization_config(grid: AffineGrid, ignore: list[str]) -> dict[str, Any]:
    """The `quantization_config` transformers 5.23 / compressed-tensors 0.17–0.20 / vLLM 0.33 read.

    Only keys that `QuantizationArgs` (pydantic, extra='forbid') knows in every one of those
    versions; `quantization_status: compressed` is what makes transformers decompress."""
    channel = grid.group_size == 0
    weights = {
        "num_bits": grid.bit_width,
        "type": "int",
        "symmetric": grid.sym,
        "group_size": None if channel else grid.group_size,
        "strategy": "channel" if channel else "group",
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": CT_FORMAT_VERSION,
    }


@register_format
class CompressedTensorsFormat(HFFormatAdapter):
    """compressed-tensors pack-quantized for vLLM (sym and asym, 2–8 bit), transformers, TGI (4/8)."""

    name = "compressed-tensors"
    quant_method = "compressed-tensors"
    engine_name = "transformers+compressed-tensors (see engine_mode)"

    @property
    def cli_prefix(self) -> str:
        return "ct"

    def supports(self, grid: Grid) -> str | None:
        if not isinstance(grid, AffineGrid):
            return f"compressed-tensors pack-quantized stores only integer affine grids, not {grid.name}"
        if grid.bit_width not in CT_BITS:
            return (f"compressed-tensors packs {grid.bit_width}-bit codes differently in 0.17 (vLLM's pin) and 0.20; "
                    f"only {'/'.join(map(str, CT_BITS))}-bit is unambiguous")
        return None

    def default_output_name(self, record: QuantizedModel) -> str:
        return "compressed-tensors"

    # ---- HFFormatAdapter hooks -----------------------------------------------------------------
    def build(self, record: QuantizedModel) -> HFExport:
        grid = uniform_grid(record, self.name)
        tensors = {}
        for qt in record.iter_quantized():
            tensors.update({f"{qt.name}.{k}": v for k, v in pack_compressed_tensors(qt).items()})
        qc = ct_quantization_config(grid, ["lm_head", *self.skipped_linears(record)])
        return HFExport(tensors, qc, card=self._card(grid))

    def _card(self, grid: AffineGrid) -> str:
        strategy = "per-channel" if grid.group_size == 0 else f"group size {grid.group_size}"
        zero = "symmetric" if grid.sym else "asymmetric (packed weight_zero_point)"
        lines = [f"compressed-tensors `pack-quantized` (`quantization_status: compressed`), "
                 f"int{grid.bit_width}, {strategy}, {zero}, fp16 scales.", ""]
        lines.append("Loads in vLLM (`CompressedTensorsWNA16`; CPU: 4-bit only), transformers "
                     "(compressed-tensors ≥ 0.15)" + (" and TGI (4/8-bit)." if grid.bit_width in (4, 8) else "."))
        if not grid.sym:
            lines.append("transformers 5.23 with compressed-tensors 0.19/0.20 fails to load packed asymmetric "
                         "zero points in its default compressed mode (size mismatch on `weight_zero_point`); load with "
                         "`quantization_config=CompressedTensorsConfig(dequantize=True)` (exact) or use "
                         "compressed-tensors 0.17. vLLM reads this directory as is.")
        return "\n".join(lines)

    def unpack_for_check(self, ck: HFCheckpoint, module: str) -> torch.Tensor:
        return unpack_compressed_tensors(ck, module)

    engine_rel_tol = 1e-5  # fp32 activations and matmul; the weights are the only fp16 rounding

    def engine_config(self, record: QuantizedModel) -> Any:
        from transformers import CompressedTensorsConfig

        return CompressedTensorsConfig(dequantize=True)

    def load_engine(self, path: Path, record: QuantizedModel, details: dict[str, Any]) -> torch.nn.Module:
        """transformers' default compressed-tensors path first (decompression on the first forward);
        if it fails — asymmetric checkpoints with transformers 5.23 + compressed-tensors 0.19/0.20:
        `weight_zero_point` size mismatch, because the meta-device compress step does not pack the
        zero point — load again with `CompressedTensorsConfig(dequantize=True)` (decompress at load)."""
        from transformers import AutoModelForCausalLM

        self._ck = None  # the control reads this directory's tensors afresh
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map="cpu").eval()
            details["engine_mode"] = "compressed (default)"
            return model
        except (RuntimeError, ValueError) as e:
            details["default_load_error"] = (
                "known failure of transformers 5.23 + compressed-tensors 0.19/0.20 with packed asymmetric zero points: "
                + str(e).strip().splitlines()[0][:200])
            log.info("transformers' default compressed-tensors load failed (%s); retrying with dequantize=True",
                     details["default_load_error"])
        details["engine_mode"] = "CompressedTensorsConfig(dequantize=True)"
        return super().load_engine(path, record, details)

    def loader_weight(self, module: torch.nn.Module, name: str, path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        """compressed-tensors' own `PackedQuantizationCompressor.decompress` on the file's tensors with
        the scale widened to float32 (must equal the record exactly), and the loaded module's dense
        weight (decompressed in the scale dtype, fp16, or exactly in fp32 in compressed mode)."""
        if type(module).__name__ != "Linear":
            return None
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationConfig

        ck = self._checkpoint(path)
        scheme = QuantizationConfig.model_validate(ck.quantization_config).config_groups["group_0"]
        sd = {k: torch.from_numpy(ck.tensor(f"{name}.{k}")) for k in _CT_TENSORS if f"{name}.{k}" in ck.files}
        sd["weight_scale"] = sd["weight_scale"].to(torch.float32)
        wide = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
        return wide, module.weight

    def _checkpoint(self, path: Path) -> HFCheckpoint:
        from .unpack_hf import open_checkpoint

        cached = getattr(self, "_ck", None)
        if cached is None or cached.path != Path(path):
            cached = self._ck = open_checkpoint(path)
        return cached
