"""GGUF for llama.cpp: one `.gguf` file that dequantizes to exactly the run's weights.

What it holds exactly: the `gguf:*` grids (Q4_0 … Q6_K, one ggml type each) and the `affine` grids
that `formats.gguf_pack` can contain without re-rounding (≤ 4-bit → Q4_0/Q5_0, symmetric 8-bit →
Q8_0). Embedding and LM head may be quantized (llama.cpp dequantizes `token_embd` rows on lookup).

The parts: `gguf_tensors` (names, types, q/k permutation), `gguf_metadata` (architecture keys),
`gguf_vocab` (tokenizer keys), `gguf_write` (write + checks + atomic rename), `gguf_verify`
(bit-exact read-back and llama.cpp against `simulate()`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import gguf

from lfq_export.formats_api import FormatAdapter, register_format
from lfq_export.grids import Grid
from lfq_export.record import QuantizedModel

from .gguf_pack import ggml_type_for
from .gguf_tensors import FP_TYPES
from .gguf_write import write_gguf

__all__ = ["GGUFFormat"]


@register_format
class GGUFFormat(FormatAdapter):
    """`--format gguf`: a single GGUF v3 file for llama.cpp (llama, qwen2, qwen3 architectures)."""

    name = "gguf"
    output_is_dir = False
    quantized_head = True

    def supports(self, grid: Grid) -> str | None:
        if ggml_type_for(grid) is None:
            return (f"no GGUF type stores {grid.name} exactly (GGUF holds the gguf:* grids, affine ≤ 4-bit with "
                    "group 32/64/128/per-channel, and symmetric 8-bit)")
        return None

    def check_tensor(self, name: str, shape: tuple[int, int], grid: Grid | None) -> str | None:
        if grid is None:
            return None
        qtype = ggml_type_for(grid)
        if qtype is None:
            return self.supports(grid)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if shape[1] % block:
            return f"row length {shape[1]} is not a multiple of {qtype.name}'s block of {block} (llama.cpp refuses it)"
        return None

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--gguf-fp-type", default="f32", choices=sorted(FP_TYPES),
                            help="storage of unquantized 2-D tensors (f16 only where exact; norms and biases stay F32)")
        parser.add_argument("--gguf-tokenizer-pre", default=None, metavar="NAME",
                            help="force llama.cpp's BPE pre-tokenizer name (default: detected from the tokenizer)")

    def preflight(self, config: dict[str, Any], tokenizer_dir: Path, options: dict[str, Any]) -> None:
        """The GGUF carries the tokenizer: convert it now, so a tokenizer llama.cpp cannot reproduce is
        refused before the run, not after it."""
        from .gguf_vocab import vocab_metadata

        vocab_metadata(tokenizer_dir, int(config["vocab_size"]), config, options.get("gguf_tokenizer_pre"))

    def default_output_name(self, record: QuantizedModel) -> str:
        slug = record.scheme.removeprefix("gguf:").replace(":", "-").replace("/", "-")
        return f"model-{slug}.gguf"

    def export(self, record: QuantizedModel, out: Path, options: dict[str, Any]) -> Path:
        return write_gguf(record, Path(out), options)

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"

    def verify(self, path: Path, record: QuantizedModel, options: dict[str, Any]) -> dict[str, Any]:
        from .gguf_verify import verify_gguf

        return verify_gguf(Path(path), record, options)
