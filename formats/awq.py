"""AWQ GEMM checkpoints (`quant_method: awq`, `version: gemm`, `zero_point: true`).

Per quantized linear `P` (K = in_features, N = out_features, G = group, K for per-channel):

    P.qweight  int32 [K, N/8]    4-bit fields along N; nibble i (bits 4i..4i+3) of word c holds
                                 column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]  (AutoAWQ's GEMM order)
    P.qzeros   int32 [K/G, N/8]  z itself (no −1), same order
    P.scales   fp16  [K/G, N]
    P.bias     as in the record

`W[n, k] = scales[k//G, n] · (q[k, n] − z[k//G, n])`, the `affine` grid exactly.

The container is 4-bit only (vLLM's AWQ `TYPE_MAP = {4: uint4}`; AutoAWQ's `from_linear` raises for
other widths). 2- and 3-bit grids are stored exactly as 4-bit codes in [0, 3] / [0, 7] with zeros in
the same range: no memory saving below 4 bits. Symmetric grids are stored as explicit zeros
`z = 2^(b−1)` with `zero_point: true`: every AWQ GEMM reader (AutoAWQ, vLLM's AWQ and AWQ-Marlin,
GPTQModel, TGI) subtracts the stored zero, and `zero_point: false` is not a layout anyone writes
(AutoAWQ's GEMM packer requires zeros), so this is the exact and portable encoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lfq_export.formats_api import register_format
from lfq_export.grids import AffineGrid, Grid
from lfq_export.record import QuantizedModel, QuantizedTensor

from .hf_checkpoint import HFExport, HFFormatAdapter, pack_bitstream, uniform_grid
from .unpack_hf import HFCheckpoint, unpack_awq

__all__ = ["AWQFormat", "AWQ_BITS", "AWQ_PACK_ORDER", "pack_awq", "awq_quantization_config"]

AWQ_BITS = (2, 3, 4)
#: nibble i of a word holds column AWQ_PACK_ORDER[i] of its block of 8 output columns
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_CONTAINER_BITS = 4


def _awq_words(values: np.ndarray) -> np.ndarray:
    """uint8 `[R, N]` (values < 16) → int32 `[R, N/8]` in AWQ column order."""
    r, n = values.shape
    blocks = values.reshape(r, n // 8, 8)[:, :, list(AWQ_PACK_ORDER)]  # nibble order within each word
    return pack_bitstream(blocks.reshape(r, n), _CONTAINER_BITS)


def pack_awq(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The AWQ GEMM tensors of one quantized linear (names relative to the module)."""
    grid = qt.grid
    assert isinstance(grid, AffineGrid)
    n, k = qt.shape
    g = grid.group_size_for(k)
    if grid.sym:
        zeros = np.full((n, k // g), grid.fixed_zero, dtype=np.uint8)
    else:
        zeros = qt.params["zero"].numpy()
    return {
        "qweight": torch.from_numpy(_awq_words(np.ascontiguousarray(qt.codes.numpy().T))),  # [K, N/8]
        "qzeros": torch.from_numpy(_awq_words(np.ascontiguousarray(zeros.T))),  # [K/G, N/8]
        "scales": qt.params["scale"].T.contiguous(),  # fp16 [K/G, N]
    }


def awq_quantization_config(grid: AffineGrid, skipped: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`quantization_config` of config.json, legacy AutoAWQ `quant_config.json`)."""
    group = grid.group_size or -1
    not_convert = skipped or None
    qc = {"quant_method": "awq", "bits": _CONTAINER_BITS, "group_size": group, "zero_point": True,
          "version": "gemm", "modules_to_not_convert": not_convert}
    legacy = {"zero_point": True, "q_group_size": group, "w_bit": _CONTAINER_BITS, "version": "gemm",
              "modules_to_not_convert": not_convert}
    return qc, legacy


@register_format
class AWQFormat(HFFormatAdapter):
    """AWQ GEMM for vLLM (AWQ-Marlin / Machete / CPU), TGI, transformers (GPTQModel), onnxruntime-genai."""

    name = "awq"
    quant_method = "awq"
    engine_name = "transformers+gptqmodel (AWQ GEMM, AwqTorchQuantLinear)"

    def supports(self, grid: Grid) -> str | None:
        if not isinstance(grid, AffineGrid):
            return f"AWQ stores only integer affine grids (s·(q − z)), not {grid.name}"
        if grid.bit_width not in AWQ_BITS:
            return f"AWQ GEMM is a 4-bit container: it holds 2/3/4-bit codes, not {grid.bit_width}-bit"
        return None

    def check_tensor(self, name: str, shape: tuple[int, int], grid: Grid | None) -> str | None:
        why = super().check_tensor(name, shape, grid)
        if why is None and grid is not None and shape[0] % 8:
            return f"AWQ packs 8 output columns per int32: out_features {shape[0]} is not a multiple of 8"
        return why

    def default_output_name(self, record: QuantizedModel) -> str:
        return "awq"

    # ---- HFFormatAdapter hooks -----------------------------------------------------------------
    def build(self, record: QuantizedModel) -> HFExport:
        grid = uniform_grid(record, self.name)
        tensors = {}
        for qt in record.iter_quantized():
            tensors.update({f"{qt.name}.{k}": v for k, v in pack_awq(qt).items()})
        qc, legacy = awq_quantization_config(grid, self.skipped_linears(record))
        return HFExport(tensors, qc, extra_json={"quant_config.json": legacy}, card=self._card(grid))

    def _card(self, grid: AffineGrid) -> str:
        b = grid.bit_width
        container = ("" if b == 4 else
                     f" The {b}-bit codes sit in AWQ's 4-bit container (values 0..{(1 << b) - 1}): exact, but no "
                     "memory saving below 4 bits.")
        zero = ("symmetric grid stored with explicit zero points z = 2^(b−1)" if grid.sym
                else "asymmetric, integer zero points")
        return (f"AWQ GEMM (`version: gemm`, `zero_point: true`), group size {grid.group_size or 'per-channel (-1)'}, "
                f"{zero}, fp16 scales, pack order [0, 2, 4, 6, 1, 3, 5, 7].{container}\n\n"
                "Loads in vLLM (AWQ-Marlin/Machete on GPU, CPUWNA16 on CPU), TGI, transformers (gptqmodel) and "
                "onnxruntime-genai's builder. Serve in float16: the scales are fp16.")

    def unpack_for_check(self, ck: HFCheckpoint, module: str) -> torch.Tensor:
        return unpack_awq(ck, module)

    #: AwqTorchLinear casts fp32 activations to fp16 and multiplies in fp16 (gptqmodel 7.6
    #: `torch_awq.py` forward): ~20 fp16 ulps of the largest logit (SmolLM2, 256 tokens, uses a quarter)
    engine_rel_tol = 1e-2

    def engine_config(self, record: QuantizedModel) -> Any:
        from transformers import AwqConfig

        return AwqConfig(bits=_CONTAINER_BITS, backend="torch_awq")

    def loader_weight(self, module: torch.nn.Module, name: str, path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        """GPTQModel's AWQ `dequantize_gemm` (what `AwqTorchLinear.forward` multiplies by), with the
        scales widened to float32 (must equal the record exactly) and as loaded (fp16)."""
        if not hasattr(module, "qzeros") or not hasattr(module, "scales"):
            return None
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        group = module.in_features // module.scales.shape[0]
        def deq(scales: torch.Tensor) -> torch.Tensor:
            return dequantize_gemm(module.qweight, module.qzeros, scales, module.bits, group).T
        return deq(module.scales.to(torch.float32)), deq(module.scales)
