"""GPTQ v1 checkpoints (`quant_method: gptq`, `checkpoint_format: gptq`, `desc_act: false`).

Per quantized linear `P` (K = in_features, N = out_features, b = bits, G = group, K for per-channel):

    P.qweight  int32 [K·b/32, N]   codes, each column a dense LSB-first b-bit stream along K
                                   (b = 3: fields straddle words, exactly AutoGPTQ's 3-bit layout)
    P.qzeros   int32 [K/G, N·b/32] z − 1 (the v1 convention), each row a stream along N
    P.scales   fp16  [K/G, N]
    P.g_idx    int32 [K]           k // G (no activation order)
    P.bias     as in the record    (Qwen2 q/k/v)

`W[n, k] = scales[g_idx[k], n] · (q[k, n] − z[g_idx[k], n])`, the `affine` grid exactly.

Why z ∈ [1, 2^b − 1] for asymmetric grids: v1 stores `z − 1`, and readers restore z by adding 1
either per field (exllama, TGI, onnxruntime-genai) or to the whole word (GPTQModel); `z = 0` is
stored as all-ones, which the two kinds of reader decode differently (formats.md §1.3). So
`constrain` sets `zero_min = 1` and the quantizer optimises inside that range. Symmetric grids
store `z = 2^(b−1)` (qzeros words 0x77777777 for 4-bit), which is what sym-only readers (vLLM ≥
0.27: Marlin/Machete `uint4b8`) assume without reading qzeros.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lfq_export.errors import FormatError
from lfq_export.formats_api import register_format
from lfq_export.grids import AffineGrid, Grid
from lfq_export.record import QuantizedModel, QuantizedTensor

from .hf_checkpoint import HFExport, HFFormatAdapter, pack_bitstream, uniform_grid
from .unpack_hf import HFCheckpoint, unpack_gptq

__all__ = ["GPTQFormat", "GPTQ_BITS", "pack_gptq", "gptq_quantization_config"]

GPTQ_BITS = (2, 3, 4, 8)


def pack_gptq(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The GPTQ v1 tensors of one quantized linear (names relative to the module)."""
    grid = qt.grid
    assert isinstance(grid, AffineGrid)
    b = grid.bit_width
    n, k = qt.shape
    g = grid.group_size_for(k)
    codes = qt.codes.numpy()  # [N, K]
    if grid.sym:
        zeros = np.full((n, k // g), grid.fixed_zero, dtype=np.uint8)
    else:
        zeros = qt.params["zero"].numpy()  # [N, K/G]
        if int(zeros.min()) < 1:
            raise FormatError(f"{qt.name}: zero point 0 cannot be stored in GPTQ v1 (quantize with --format gptq)")
    qweight = pack_bitstream(codes, b).T  # [K·b/32, N]
    qzeros = pack_bitstream((zeros - 1).T, b)  # [K/G, N·b/32]
    return {
        "qweight": torch.from_numpy(np.ascontiguousarray(qweight)),
        "qzeros": torch.from_numpy(qzeros),
        "scales": qt.params["scale"].T.contiguous(),  # fp16 [K/G, N]
        "g_idx": torch.arange(k, dtype=torch.int32) // g,
    }


def gptq_quantization_config(grid: AffineGrid, skipped: list[str]) -> dict[str, Any]:
    """`quantization_config` (also written as `quantize_config.json` for AutoGPTQ-era tooling).

    vLLM requires bits/group_size/desc_act/sym; TGI defaults `sym` to false when absent;
    transformers reads `format` and its legacy alias `checkpoint_format`. Linears kept in FP are
    excluded with GPTQModel's `dynamic` negative rules (read by GPTQModel and vLLM)."""
    qc: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": grid.bit_width,
        "group_size": grid.group_size or -1,
        "desc_act": False,
        "sym": grid.sym,
        "lm_head": False,
        "checkpoint_format": "gptq",
        "format": "gptq",
        "true_sequential": True,
        "damp_percent": 0.01,
        "static_groups": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": ["lfq-export"]},
    }
    if skipped:
        qc["dynamic"] = {f"-:^{_escape(m)}$": {} for m in skipped}
    return qc


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


@register_format
class GPTQFormat(HFFormatAdapter):
    """GPTQ v1 for transformers (GPTQModel), vLLM (sym 4/8-bit), TGI, onnxruntime-genai."""

    name = "gptq"
    quant_method = "gptq"
    engine_name = "transformers+gptqmodel (GPTQ v1, TorchQuantLinear)"

    def supports(self, grid: Grid) -> str | None:
        if not isinstance(grid, AffineGrid):
            return f"GPTQ stores only integer affine grids (s·(q − z)), not {grid.name}"
        if grid.bit_width not in GPTQ_BITS:
            return f"GPTQ stores {GPTQ_BITS}-bit codes, not {grid.bit_width}-bit"
        if not grid.sym and grid.zero_min < 1:
            return "GPTQ v1 stores z − 1, so a zero point of 0 has no consistent encoding (zero_min must be ≥ 1)"
        return None

    def constrain(self, grid: Grid) -> Grid:
        if isinstance(grid, AffineGrid) and not grid.sym and grid.zero_min < 1:
            return dataclasses.replace(grid, zero_min=1)
        return grid

    def check_tensor(self, name: str, shape: tuple[int, int], grid: Grid | None) -> str | None:
        why = super().check_tensor(name, shape, grid)
        if why or not isinstance(grid, AffineGrid):
            return why
        n, k = shape
        b = grid.bit_width
        if (k * b) % 32 or (n * b) % 32:
            m = 32 // np.gcd(32, b)
            return (f"GPTQ packs {b}-bit codes into int32 along both dimensions: "
                    f"in ({k}) and out ({n}) must be multiples of {m}")
        return None

    def default_output_name(self, record: QuantizedModel) -> str:
        return "gptq"

    # ---- HFFormatAdapter hooks -----------------------------------------------------------------
    def build(self, record: QuantizedModel) -> HFExport:
        grid = uniform_grid(record, self.name)
        tensors = {}
        for qt in record.iter_quantized():
            tensors.update({f"{qt.name}.{k}": v for k, v in pack_gptq(qt).items()})
        qc = gptq_quantization_config(grid, self.skipped_linears(record))
        return HFExport(tensors, qc, extra_json={"quantize_config.json": qc}, card=self._card(grid))

    def _card(self, grid: AffineGrid) -> str:
        zero = "symmetric (z = 2^(b−1))" if grid.sym else "asymmetric, z ∈ [1, 2^b−1]"
        return (
            f"GPTQ v1 (`checkpoint_format: gptq`), {grid.bit_width}-bit, group size "
            f"{grid.group_size or 'per-channel (-1)'}, {zero}, "
            "`desc_act: false`, trivial `g_idx`, fp16 scales, int32 packing.\n\n"
            "Loads in transformers (optimum + gptqmodel) on CPU and GPU"
            + ("; vLLM ≥ 0.27 loads it (Marlin/Machete; CPU: 4-bit only)." if grid.sym and grid.bit_width in (4, 8)
               else "; vLLM ≥ 0.27 refuses it (its GPTQ path is symmetric 4/8-bit only): use the AWQ or "
                    "compressed-tensors export of the same run for vLLM.")
            + "\nServe in float16: the scales are fp16 (bfloat16 serving would round them)."
        )

    def unpack_for_check(self, ck: HFCheckpoint, module: str) -> torch.Tensor:
        return unpack_gptq(ck, module)

    #: TorchQuantLinear dequantizes to fp16, then multiplies in the activation dtype (fp32 here)
    engine_rel_tol = 1e-5

    def engine_config(self, record: QuantizedModel) -> Any:
        from transformers import GPTQConfig

        grid = uniform_grid(record, self.name)
        return GPTQConfig(bits=grid.bit_width, backend="gptq_torch")

    def loader_weight(self, module: torch.nn.Module, name: str, path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        """GPTQModel's own `dequantize_weight()` ([K, N]): with its scales widened to float32 (must
        equal the record exactly) and as loaded (fp16 scales: the record rounded once to fp16)."""
        if not hasattr(module, "dequantize_weight"):
            return None
        native = module.dequantize_weight().T
        scales = module.scales
        module.scales = scales.to(torch.float32)
        try:
            wide = module.dequantize_weight().T
        finally:
            module.scales = scales
        return wide, native
