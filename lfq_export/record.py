"""The QuantizedModel record: everything an exporter, verifier or evaluator needs, and nothing of the
quantizer's internals.

On disk (a run directory):

    record.json                 version, status, config, scheme, per-tensor grid + shape, report
    blocks/block_0000.safetensors   block 0: quantized codes/params and its FP tensors (norms, biases)
    nonblock.safetensors        embedding, final norm, head (FP, or quantized when the scheme says so)
    tokenizer/                  tokenizer and generation files of the input model

Keys inside the safetensors files: `q.<module>.codes`, `q.<module>.<param>` for quantized weights,
`fp.<tensor name>` for FP tensors. A block file is written atomically when its block is finished,
which is what makes an interrupted run resumable at the first unfinished block.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_file
from .errors import RecordError
from .grids import Grid, grid_from_dict

__all__ = ["RECORD_VERSION", "RunStatus", "QuantizedTensor", "QuantizedModel", "block_file", "write_tensors"]

#: bump when the on-disk layout changes; `load` refuses other versions with a clear message
RECORD_VERSION = 1

NONBLOCK_FILE = "nonblock.safetensors"


def block_file(i: int) -> str:
    return f"blocks/block_{i:04d}.safetensors"


class RunStatus(str, Enum):
    """Lifecycle of a run directory; `resume` reads it."""

    QUANTIZING = "quantizing"  # blocks are being written; resumable
    COMPLETE = "complete"  # every block and the non-block tensors are written


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized weight.

    Attributes:
        name: module name in HF terms, e.g. `model.layers.0.self_attn.q_proj` (weight = name + `.weight`).
        grid: the storage grid; `grid.dequantize(codes, params)` is the exact weight.
        codes: uint8 `[out, in]`, values in `[0, grid.qmax]`.
        params: grid parameters in their storage dtypes (`grid.param_spec`).
        orig_dtype: dtype of the FP weight it replaced (e.g. `bfloat16`).
    """

    name: str
    grid: Grid
    codes: torch.Tensor
    params: dict[str, torch.Tensor]
    orig_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 2:
            raise RecordError(f"{self.name}: codes must be a 2-D uint8 tensor")
        if int(self.codes.max()) > self.grid.qmax:
            raise RecordError(f"{self.name}: code {int(self.codes.max())} exceeds {self.grid.name} maximum {self.grid.qmax}")
        spec = self.grid.param_spec(*self.codes.shape)
        for k, (shape, dtype) in spec.items():
            v = self.params.get(k)
            if v is None or tuple(v.shape) != tuple(shape) or v.dtype != dtype:
                got = None if v is None else (tuple(v.shape), v.dtype)
                raise RecordError(f"{self.name}: parameter {k} is {got}, {self.grid.name} needs {(shape, dtype)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """The exact float32 weight every export must reproduce bit for bit."""
        return self.grid.dequantize(self.codes, self.params)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"q.{self.name}.codes": self.codes}
        out.update({f"q.{self.name}.{k}": v for k, v in self.params.items()})
        return out


@dataclass
class QuantizedModel:
    """A quantized model: quantized weights on their grids, the FP remainder, config, tokenizer, report.

    Attributes:
        config: the HF `config.json` contents of the FP model.
        family: adapter family (llama, mistral, qwen2, qwen3).
        scheme: the scheme name the user asked for (e.g. `w4g128`, `gguf:q4_k_m`).
        quantized: module name → QuantizedTensor.
        fp: full tensor name → FP tensor (embedding, norms, biases, unquantized linears).
        tokenizer_dir: directory holding the tokenizer files (inside the run directory once saved).
        formats: export formats the grids were constrained for.
        report: settings, per-block losses, timings, seeds, skipped tensors, notes.
    """

    config: dict[str, Any]
    family: str
    scheme: str
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    fp: dict[str, torch.Tensor] = field(default_factory=dict)
    tokenizer_dir: Path | None = None
    formats: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    status: RunStatus = RunStatus.COMPLETE

    # ---- views -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def dequantized_state_dict(self) -> dict[str, torch.Tensor]:
        """Full float32 state dict with every quantized weight replaced by its exact dequantization."""
        sd = {k: v.to(torch.float32) for k, v in self.fp.items()}
        for name, qt in self.quantized.items():
            sd[f"{name}.weight"] = qt.dequantize()
        return sd

    def block_tensors(self, i: int, prefix: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, qt in self.quantized.items():
            if name.startswith(prefix):
                out.update(qt.tensors())
        out.update({f"fp.{k}": v for k, v in self.fp.items() if k.startswith(prefix)})
        return out

    # ---- persistence -------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {
            "record_version": RECORD_VERSION,
            "status": self.status.value,
            "family": self.family,
            "scheme": self.scheme,
            "formats": list(self.formats),
            "config": self.config,
            "quantized": {
                n: {"grid": qt.grid.to_dict(), "shape": list(qt.shape), "orig_dtype": qt.orig_dtype}
                for n, qt in sorted(self.quantized.items())
            },
            "report": self.report,
        }

    def save(self, run_dir: Path, blocks_prefix: str = "model.layers.") -> None:
        """Write every file of the record into an existing run directory (each file atomically)."""
        run_dir = Path(run_dir)
        for i in range(self.n_layers):
            write_tensors(run_dir / block_file(i), self.block_tensors(i, f"{blocks_prefix}{i}."))
        nonblock = {k: v for k, v in self._all_tensors().items() if not _is_block_key(k, blocks_prefix)}
        write_tensors(run_dir / NONBLOCK_FILE, nonblock)
        write_manifest(run_dir, self.manifest())

    def _all_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for qt in self.quantized.values():
            out.update(qt.tensors())
        out.update({f"fp.{k}": v for k, v in self.fp.items()})
        return out

    @classmethod
    def load(cls, run_dir: Path | str, require_complete: bool = True) -> QuantizedModel:
        """Load a run directory; refuses missing, incomplete, corrupt or other-version records."""
        run_dir = Path(run_dir)
        m = read_manifest(run_dir)
        status = RunStatus(m["status"])
        if require_complete and status is not RunStatus.COMPLETE:
            raise RecordError(f"{run_dir}: the quantization run is not finished (status {status.value}); "
                              f"resume it with `lfq-export quantize ... --out {run_dir} --resume`")
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted((run_dir / "blocks").glob("block_*.safetensors")) + [run_dir / NONBLOCK_FILE]:
            if f.is_file():
                tensors.update(read_tensors(f))
        quantized = {}
        for name, meta in m["quantized"].items():
            grid = grid_from_dict(meta["grid"])
            codes = tensors.get(f"q.{name}.codes")
            if codes is None:
                if require_complete:
                    raise RecordError(f"{run_dir}: quantized tensor {name} is missing from the record files")
                continue
            shape = tuple(codes.shape)
            params = {k: tensors[f"q.{name}.{k}"] for k in grid.param_spec(*shape)}
            quantized[name] = QuantizedTensor(name, grid, codes, params, meta.get("orig_dtype", "float32"))
        fp = {k[3:]: v for k, v in tensors.items() if k.startswith("fp.")}
        tok = run_dir / "tokenizer"
        return cls(
            config=m["config"], family=m["family"], scheme=m["scheme"], quantized=quantized, fp=fp,
            tokenizer_dir=tok if tok.is_dir() else None, formats=list(m.get("formats", [])),
            report=m.get("report", {}), status=status,
        )

    def iter_quantized(self) -> Iterator[QuantizedTensor]:
        for name in sorted(self.quantized):
            yield self.quantized[name]


def _is_block_key(key: str, blocks_prefix: str) -> bool:
    return key.split(".", 1)[1].startswith(blocks_prefix)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (contiguous copies, so views are safe to pass)."""
    with atomic_file(path, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise RecordError(f"{path}: corrupt record file ({e}); delete the run directory and quantize again") from None


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    with atomic_file(Path(run_dir) / "record.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Enum):
        return o.value
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / "record.json"
    if not p.is_file():
        raise RecordError(f"{run_dir}: not a run directory (no record.json); create one with `lfq-export quantize`")
    try:
        m = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{p}: unreadable ({e})") from None
    v = m.get("record_version")
    if v != RECORD_VERSION:
        raise RecordError(f"{run_dir}: record version {v} is not supported by this lfq-export "
                          f"(version {RECORD_VERSION}); re-run `lfq-export quantize` to rebuild it")
    return m
