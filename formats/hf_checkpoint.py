"""The Hugging Face model directory shared by the GPTQ, AWQ and compressed-tensors exports.

Why one module: the three formats differ only in how a quantized linear becomes tensors and in
`quantization_config`; the directory around them (config, shards, tokenizer, card) and its checks
are the same, and every loader (transformers, vLLM, TGI, onnxruntime-genai's builder) reads it
the same way.

Layout written (all inside a temporary directory next to the destination, renamed when checked):

    config.json                  the record's model config + `quantization_config`,
                                 `torch_dtype`/`dtype: float16` (the scales are fp16; vLLM allocates
                                 scales in the serving dtype, so float16 serving keeps them exact)
    model.safetensors            all tensors, or, above the shard size,
    model-0000i-of-0000n.safetensors + model.safetensors.index.json  (`metadata.total_size`, `weight_map`)
    generation_config.json       from the record's tokenizer directory, else bos/eos of the config
    tokenizer files              copied from `record.tokenizer_dir`
    <legacy>.json                `quantize_config.json` (GPTQ) / `quant_config.json` (AWQ)
    README.md                    model card: what was quantized, how, parity results when known

Unquantized tensors (embedding, norms, biases, LM head) keep the record's dtype, so every tensor
of the directory equals the record exactly; a tied LM head is not written (the config ties it).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from lfq_export.atomic import atomic_dir
from lfq_export.errors import FormatError, VerificationError
from lfq_export.formats_api import FormatAdapter
from lfq_export.record import QuantizedModel

from .unpack_hf import HFCheckpoint, open_checkpoint

__all__ = [
    "HFFormatAdapter",
    "HFExport",
    "uniform_grid",
    "ordered",
    "iter_modules",
    "DEFAULT_SHARD_SIZE",
    "pack_bitstream",
    "parse_size",
    "unquantized_tensors",
    "model_config",
    "write_hf_dir",
    "check_hf_dir",
    "model_card",
    "read_quant_method",
    "add_hf_cli_options",
    "hf_options",
]

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5 * 1000**3  # bytes; transformers' save_pretrained default
INDEX_FILE = "model.safetensors.index.json"
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


# ---- packing primitive -----------------------------------------------------------------------
def pack_bitstream(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned `bits`-bit fields along the last axis into int32 words, LSB first, densely.

    Field i occupies global bits `[i·bits, (i+1)·bits)` of the row's little-endian bit stream, so
    for b ∈ {2, 4, 8} word j holds fields `j·32/b …` at bits `(i mod 32/b)·b`, and 3-bit fields
    straddle words (GPTQ's 3-bit layout and compressed-tensors ≥ 0.20's dense packing are both this
    stream). The row length in bits must be a multiple of 32 (callers check shapes first)."""
    v = np.ascontiguousarray(values, dtype=np.uint8)
    rows_shape, length = v.shape[:-1], v.shape[-1]
    if (length * bits) % 32:
        raise FormatError(f"cannot pack {length} fields of {bits} bits into whole 32-bit words")
    if int(v.max(initial=0)) >> bits:
        raise FormatError(f"a value does not fit in {bits} bits")
    bit_planes = (v[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # [..., L, bits], LSB first
    stream = np.packbits(bit_planes.reshape(*rows_shape, length * bits), axis=-1, bitorder="little")
    return np.ascontiguousarray(stream).view("<u4").astype(np.uint32).view(np.int32)


def parse_size(size: int | str | None) -> int:
    """Bytes from `1000000`, `"500MB"`, `"2GB"`, `"1GiB"` (None → the default shard size)."""
    if size is None:
        return DEFAULT_SHARD_SIZE
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE_RE.match(str(size))
        if not m:
            raise FormatError(f"shard size {size!r}: use a byte count or a number with KB/MB/GB")
        n = int(float(m[1]) * _UNITS[(m[2] or "B").lower()])
    if n <= 0:
        raise FormatError(f"shard size {size!r} must be positive")
    return n


# ---- options -----------------------------------------------------------------------------------
def add_hf_cli_options(parser: Any, prefix: str) -> None:
    """`--PREFIX-shard-size` and `--PREFIX-parity-json` for one HF-directory format."""
    parser.add_argument(f"--{prefix}-shard-size", default=None, metavar="SIZE",
                        help="largest safetensors shard (e.g. 2GB); default 5GB")
    parser.add_argument(f"--{prefix}-parity-json", default=None, type=Path, metavar="FILE",
                        help="result of `lfq-export verify --json`, quoted in the model card")


def hf_options(options: Mapping[str, Any], prefix: str) -> tuple[int, dict[str, Any] | None]:
    """(shard bytes, parity dict or None) from export options (`PREFIX_shard_size` or `shard_size`)."""
    key = prefix.replace("-", "_")
    shard = parse_size(options.get(f"{key}_shard_size") or options.get("shard_size"))
    parity = options.get(f"{key}_parity_json") or options.get("parity")
    if isinstance(parity, (str, Path)):
        try:
            parity = json.loads(Path(parity).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FormatError(f"{parity}: cannot read the parity JSON ({e})") from None
    return shard, parity


# ---- content -----------------------------------------------------------------------------------
def unquantized_tensors(record: QuantizedModel) -> dict[str, torch.Tensor]:
    """The record's FP tensors to write unchanged (a tied LM head is left to the config)."""
    out = dict(record.fp)
    if record.tied:
        out.pop("lm_head.weight", None)
    return out


def model_config(record: QuantizedModel, quantization_config: dict[str, Any]) -> dict[str, Any]:
    """config.json: the model's config with `quantization_config` and float16 as the model dtype."""
    cfg = {k: v for k, v in record.config.items() if k not in ("quantization_config", "_name_or_path")}
    cfg["torch_dtype"] = "float16"  # transformers < 5 and vLLM read this name
    cfg["dtype"] = "float16"  # transformers 5 writes this name
    cfg["quantization_config"] = quantization_config
    return cfg


def _generation_config(record: QuantizedModel) -> dict[str, Any]:
    src = record.tokenizer_dir / "generation_config.json" if record.tokenizer_dir else None
    if src is not None and src.is_file():
        return json.loads(src.read_text())
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {"_from_model_config": True, **{k: record.config[k] for k in keys if record.config.get(k) is not None}}


@dataclass
class HFExport:
    """Everything one format contributes to the directory.

    Attributes:
        tensors: name → tensor, in the order they should appear in the shards.
        quantization_config: the `quantization_config` dict of config.json.
        extra_json: extra JSON files (legacy configs), file name → content.
        card: the format-specific part of the model card (markdown).
    """

    tensors: dict[str, torch.Tensor]
    quantization_config: dict[str, Any]
    extra_json: dict[str, dict[str, Any]] = field(default_factory=dict)
    card: str = ""


def _shards(tensors: Mapping[str, torch.Tensor], shard_bytes: int) -> list[list[str]]:
    """Consecutive groups of tensor names, each under `shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_hf_dir(tmp: Path, record: QuantizedModel, export: HFExport, card: str, shard_bytes: int) -> None:
    """Write the whole directory into the (empty, temporary) `tmp`."""
    groups = _shards(export.tensors, shard_bytes)
    meta = {"format": "pt"}
    if len(groups) == 1:
        save_file({k: export.tensors[k].contiguous() for k in groups[0]}, str(tmp / "model.safetensors"), metadata=meta)
    else:
        weight_map: dict[str, str] = {}
        for i, names in enumerate(groups, 1):
            fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_file({k: export.tensors[k].contiguous() for k in names}, str(tmp / fname), metadata=meta)
            weight_map.update({k: fname for k in names})
        total = sum(t.numel() * t.element_size() for t in export.tensors.values())
        _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(tmp / "config.json", model_config(record, export.quantization_config))
    _write_json(tmp / "generation_config.json", _generation_config(record))
    for name, content in export.extra_json.items():
        _write_json(tmp / name, content)
    if record.tokenizer_dir is not None:
        for f in _TOKENIZER_FILES:
            if (record.tokenizer_dir / f).is_file():
                shutil.copy2(record.tokenizer_dir / f, tmp / f)
    (tmp / "README.md").write_text(card)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n")


# ---- post-write check ----------------------------------------------------------------------------
_ST_DTYPES = {torch.int32: "I32", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float32: "F32", torch.uint8: "U8", torch.int8: "I8"}


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise VerificationError(f"{path.name}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size != 8 + n + end:
        raise VerificationError(f"{path.name}: size {path.stat().st_size} ≠ header + data {8 + n + end}")
    return header


def check_hf_dir(tmp: Path, export: HFExport, sample_check: Callable[[Path], None]) -> None:
    """Sizes and headers of every shard against the tensors meant to be there, the index, the
    config, then `sample_check(tmp)` (a few weights decoded by the independent unpacker)."""
    index = tmp / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
        weight_map = None
    seen: dict[str, str] = {}
    for fname in files:
        header = _read_header(tmp / fname)
        for name, info in header.items():
            if name != "__metadata__":
                seen[name] = fname
                t = export.tensors.get(name)
                if t is None or info["dtype"] != _ST_DTYPES[t.dtype] or info["shape"] != list(t.shape):
                    raise VerificationError(f"{fname}: tensor {name} {info['dtype']}{info['shape']} was not meant "
                                            f"to be written like that")
    if set(seen) != set(export.tensors) or (weight_map is not None and weight_map != seen):
        raise VerificationError(f"{tmp.name}: written tensors and index disagree with the export "
                                f"({len(seen)} written, {len(export.tensors)} expected)")
    cfg = json.loads((tmp / "config.json").read_text())
    if cfg.get("quantization_config") != export.quantization_config:
        raise VerificationError(f"{tmp.name}: config.json lost its quantization_config")
    sample_check(tmp)


def read_quant_method(path: Path) -> str | None:
    """`quantization_config.quant_method` of a model directory, or None."""
    cfg = Path(path) / "config.json"
    if not Path(path).is_dir() or not cfg.is_file():
        return None
    try:
        return (json.loads(cfg.read_text()).get("quantization_config") or {}).get("quant_method")
    except (OSError, json.JSONDecodeError):
        return None


# ---- model card ----------------------------------------------------------------------------------
def _grid_summary(record: QuantizedModel) -> list[str]:
    counts: dict[str, int] = {}
    for qt in record.iter_quantized():
        counts[qt.grid.name] = counts.get(qt.grid.name, 0) + 1
    return [f"- `{g}`: {n} linear layers" for g, n in sorted(counts.items())]


def _settings_lines(report: Mapping[str, Any]) -> list[str]:
    s = report.get("settings") or {}
    keys = ["scheme", "method"]
    if s.get("method") != "rtn":
        keys += ["final_loss", "iters", "lr", "final_iters", "final_lr"]
    if s.get("calib") is not None:
        keys += ["calib", "nsamples", "seqlen"]
    keys += ["seed"]
    lines = [f"- {k}: `{s[k]}`" for k in keys if s.get(k) is not None]
    t = (report.get("timings") or {}).get("total_seconds")
    if t is not None:
        lines.append(f"- quantization time: {t} s")
    return lines


def _parity_lines(parity: Mapping[str, Any] | None) -> list[str]:
    if not parity:
        return ["Not measured at export time. Run `lfq-export verify <this dir> --run <run dir>`: it decodes every",
                "tensor with an independent reader (must equal the simulated weights bit for bit) and compares",
                "transformers' logits with the simulation."]
    keys = ("weights_exact", "engine", "tokens", "top1_agreement", "kl_mean", "max_abs_diff", "tokens_match",
            "control_exact", "tolerance")
    return [f"- {k}: `{parity[k]}`" for k in keys if k in parity]


def model_card(record: QuantizedModel, fmt: str, format_section: str, parity: Mapping[str, Any] | None) -> str:
    """README.md: what was quantized (grids, FP tensors), how (the run report), format notes, parity."""
    kept = sorted(unquantized_tensors(record))
    origin = (record.report or {}).get("model", "unknown")
    version = (record.report or {}).get("lfq_export_version", "")
    lines = [
        "---", "library_name: transformers", "tags: [lfq-export, quantized, " + fmt + "]", "---", "",
        f"# {Path(str(origin)).name} — {record.scheme} ({fmt})", "",
        f"Exported by lfq-export {version} from `{origin}`. Every weight in",
        "these files dequantizes exactly (bit for bit in float32) to the weights the quantizer simulated.", "",
        "## What is quantized", "", *_grid_summary(record),
        f"- kept unquantized ({len(kept)} tensors): embedding, norms, biases"
        + (", LM head" if "lm_head.weight" in kept else " (LM head tied to the embedding)"), "",
        "## How", "", *_settings_lines(record.report or {}), "",
        "## Format", "", format_section.strip(), "",
        "## Parity", "", *_parity_lines(parity), "",
    ]
    return "\n".join(lines)


def iter_modules(record: QuantizedModel) -> Iterable[str]:
    """Quantized module names in model order (layer index, then name)."""
    def key(n: str) -> tuple[int, str]:
        m = re.search(r"\.layers\.(\d+)\.", n)
        return (int(m[1]) if m else -1, n)
    return sorted(record.quantized, key=key)


# ---- the adapter base ------------------------------------------------------------------------------
def uniform_grid(record: QuantizedModel, fmt: str) -> Any:
    """The one grid every quantized linear uses (these formats hold one scheme per checkpoint)."""
    grids = {qt.grid for qt in record.iter_quantized()}
    if len(grids) != 1:
        names = ", ".join(sorted(g.name for g in grids)) or "none"
        raise FormatError(f"{fmt} holds one grid per checkpoint; this run uses: {names}")
    return grids.pop()


def ordered(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors in model order (embedding, layer 0, layer 1, …, final norm, head): shards stay layer-contiguous."""
    def key(n: str) -> tuple[int, str]:
        m = re.search(r"\.layers\.(\d+)\.", n)
        if m:
            return (int(m[1]), n)
        return (-1, n) if "embed" in n else (1 << 30, n)
    return {k: tensors[k] for k in sorted(tensors, key=key)}


class HFFormatAdapter(FormatAdapter):
    """Export / detect / verify shared by the HF-directory formats. Subclasses implement `build`
    (tensors + quantization_config), `unpack_for_check` (the independent reader of one module),
    `engine_config` (the transformers `quantization_config` to load with) and `loader_weight`
    (the loader's own dequantized weight of a module, the control)."""

    quant_method: str
    engine_name: str

    @property
    def cli_prefix(self) -> str:
        return self.name

    def add_cli_options(self, parser: Any) -> None:
        add_hf_cli_options(parser, self.cli_prefix)

    def detect(self, path: Path) -> bool:
        return read_quant_method(Path(path)) == self.quant_method

    def skipped_linears(self, record: QuantizedModel) -> list[str]:
        """Block linears the run kept in FP (`--skip-unquantizable`): loaders must leave them alone."""
        kept = (record.report or {}).get("kept_fp") or {}
        return sorted(n for n in kept if f"{n}.weight" in record.fp)

    def export(self, record: QuantizedModel, out: Path, options: dict[str, Any]) -> Path:
        shard_bytes, parity = hf_options(options, self.cli_prefix)
        built = self.build(record)
        built.tensors = ordered({**unquantized_tensors(record), **built.tensors})
        card = model_card(record, self.name, built.card, parity)
        out = Path(out)
        with atomic_dir(out, overwrite=bool(options.get("overwrite")),
                        check=lambda tmp: check_hf_dir(tmp, built, lambda d: self._sample_check(d, record))) as tmp:
            write_hf_dir(tmp, record, built, card, shard_bytes)
        log.info("wrote %s (%s, %d quantized linears)", out, self.name, len(record.quantized))
        return out

    def _sample_check(self, tmp: Path, record: QuantizedModel) -> None:
        """First, middle and last quantized linear decoded by the independent reader == the record."""
        ck = open_checkpoint(tmp)
        mods = list(iter_modules(record))
        for m in {mods[0], mods[len(mods) // 2], mods[-1]} if mods else ():
            got = self.unpack_for_check(ck, m)
            if not torch.equal(got, record.quantized[m].dequantize()):
                raise VerificationError(f"{m}: the written {self.name} tensors do not decode to the record's weights")

    # ---- verify (formats/hf_verify.py) --------------------------------------------------------
    #: engine logits vs the arithmetic reference, relative to max |logit| (set by each loader's arithmetic)
    engine_rel_tol: float = 1e-5

    def verify(self, path: Path, record: QuantizedModel, options: dict[str, Any]) -> dict[str, Any]:
        """Weights bit for bit (independent unpacker), transformers' real loader against `simulate()`
        with its own dequantization as the control, and the tokenizer (see `hf_verify.verify_hf`)."""
        from .hf_verify import verify_hf

        return verify_hf(self, Path(path), record, options)

    def load_engine(self, path: Path, record: QuantizedModel, details: dict[str, Any]) -> torch.nn.Module:
        """The directory loaded by transformers' own quantizer on CPU in float32."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map="cpu",
                                                    quantization_config=self.engine_config(record)).eval()

    # ---- hooks -----------------------------------------------------------------------------------
    @abstractmethod
    def build(self, record: QuantizedModel) -> HFExport:
        """The format's tensors (module prefix + suffix) and configs for the whole record."""

    @abstractmethod
    def unpack_for_check(self, ck: HFCheckpoint, module: str) -> torch.Tensor:
        """One module's float32 weight `[N, K]` decoded by the independent unpacker."""

    def engine_config(self, record: QuantizedModel) -> Any:
        """The `quantization_config` object transformers loads the directory with (None: its own)."""
        return None

    @abstractmethod
    def loader_weight(self, module: torch.nn.Module, name: str, path: Path) -> Any:
        """The loader's own dequantization of one module: (float32-widened, as loaded), or None."""
