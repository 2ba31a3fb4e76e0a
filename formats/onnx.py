"""ONNX Runtime / onnxruntime-genai export: a full decoder whose linears are `MatMulNBits` nodes.

The output directory holds `model.onnx` (+ `model.onnx.data` when the weights pass 2 GB),
`genai_config.json`, the tokenizer files and `export_report.json`. Load it with
`onnxruntime_genai.Model(dir)` or with `onnxruntime.InferenceSession(dir/"model.onnx")`.

Exactness: every quantized linear's codes, scales and zero points are copied into MatMulNBits
inputs without re-rounding (`onnx_pack`); `verify` reads them back with an independent unpacker
(`unpack_onnx`) and compares with the record bit for bit, then runs onnxruntime and
onnxruntime-genai against `simulate()`. With the default fp32 activations and `accuracy_level` 0
the engine dequantizes exactly and differs from the simulation only by fp32 summation order.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lfq_export.atomic import atomic_dir
from lfq_export.compare import compare_logits, compare_weights, first_divergence
from lfq_export.errors import FormatError, VerificationError
from lfq_export.formats_api import FormatAdapter, register_format
from lfq_export.grids import Grid
from lfq_export.record import QuantizedModel

from .onnx_genai import GENAI_CONFIG, special_ids, write_genai_files
from .onnx_graph import GraphOptions, build_decoder, check_config
from .onnx_pack import grid_reason
from .unpack_onnx import iter_matmulnbits, read_initializers, read_matmulnbits

__all__ = ["OnnxFormat", "OnnxOptions", "MODEL_FILE", "DATA_FILE", "REPORT_FILE"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
REPORT_FILE = "export_report.json"
#: protobuf cannot serialise a message over 2 GiB: larger models keep their weights in DATA_FILE
_PROTO_LIMIT = 2 * 1024**3 - 64 * 1024**2
#: engine tolerances (relative L2 of logits) at accuracy_level 0 with fp32 activations
LOGITS_REL_TOL = 1e-4
KV_REL_TOL = 1e-5


@dataclass(frozen=True)
class OnnxOptions:
    """Export options (CLI `--onnx-*`).

    Attributes:
        dtype: activation, KV-cache and scale dtype: float32 (CPU default) or float16.
        accuracy_level: MatMulNBits accuracy_level: 0 exact fp32 compute, 4 int8 activations (faster).
        context_length: genai context / KV buffer length (default: max_position_embeddings).
        external_data: always keep weights in `model.onnx.data` (automatic above 2 GB).
        fuse: fuse q/k/v and gate/up MatMulNBits nodes.
    """

    dtype: str = "float32"
    accuracy_level: int = 0
    context_length: int | None = None
    external_data: bool = False
    fuse: bool = True

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> OnnxOptions:
        get = lambda k, d: d if options.get(k) is None else options[k]  # noqa: E731
        o = cls(dtype=str(get("onnx_dtype", "float32")), accuracy_level=int(get("onnx_accuracy_level", 0)),
                context_length=get("onnx_context_length", None), external_data=bool(get("onnx_external_data", False)),
                fuse=bool(get("onnx_fuse", True)))
        if o.dtype not in ("float32", "float16"):
            raise FormatError(f"--onnx-dtype {o.dtype}: choose float32 or float16")
        if o.accuracy_level not in (0, 1, 2, 3, 4):
            raise FormatError(f"--onnx-accuracy-level {o.accuracy_level}: choose 0 (exact), 1, 2, 3 or 4 (int8)")
        return o


@register_format
class OnnxFormat(FormatAdapter):
    """`com.microsoft::MatMulNBits` decoder for onnxruntime and onnxruntime-genai."""

    name = "onnx"
    output_is_dir = True

    # ---- capability ---------------------------------------------------------------------------
    def supports(self, grid: Grid) -> str | None:
        return grid_reason(grid)

    # ---- I/O ----------------------------------------------------------------------------------
    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--onnx-dtype", default="float32", choices=["float32", "float16"],
                            help="onnx: activation/KV dtype (float32: near-exact on CPU; float16 rounds activations)")
        parser.add_argument("--onnx-accuracy-level", type=int, default=0, choices=[0, 1, 2, 3, 4],
                            help="onnx: MatMulNBits accuracy_level; 0 = exact fp32 compute, 4 = int8 activations")
        parser.add_argument("--onnx-context-length", type=int, default=None,
                            help="onnx: genai context length / KV buffer (default: max_position_embeddings)")
        parser.add_argument("--onnx-external-data", action="store_true",
                            help="onnx: always store weights in model.onnx.data (automatic above 2 GB)")

    def default_output_name(self, record: QuantizedModel) -> str:
        return "onnx"

    def export(self, record: QuantizedModel, out: Path, options: dict[str, Any]) -> Path:
        opts = OnnxOptions.from_dict(options)
        self._check_record(record)
        t0 = time.perf_counter()
        built = build_decoder(record, GraphOptions(opts.dtype, opts.accuracy_level, opts.fuse))
        with atomic_dir(Path(out), overwrite=bool(options.get("overwrite")),
                        check=lambda tmp: _post_write_check(tmp, record)) as tmp:
            external = _save(built.model, tmp, opts.external_data)
            files = write_genai_files(record, tmp, opts.context_length)
            report = _report(record, opts, built.notes, built.n_matmulnbits, external, files, time.perf_counter() - t0)
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
        for note in built.notes:
            log.info("onnx: %s", note)
        log.info("onnx: wrote %s (%d MatMulNBits nodes)", out, built.n_matmulnbits)
        return Path(out)

    def _check_record(self, record: QuantizedModel) -> None:
        why = check_config(record.config, record.family)
        if why:
            raise FormatError(f"onnx cannot build this {record.family} model exactly: {why}")
        for qt in record.iter_quantized():
            reason = self.supports(qt.grid) or self.check_tensor(qt.name, qt.shape, qt.grid)
            if reason:
                raise FormatError(f"{qt.name} ({qt.grid.name}) cannot be stored exactly in onnx: {reason}")

    def detect(self, path: Path) -> bool:
        path = Path(path)
        return path.is_dir() and (path / MODEL_FILE).is_file()

    # ---- verification -------------------------------------------------------------------------
    def verify(self, path: Path, record: QuantizedModel, options: dict[str, Any]) -> dict[str, Any]:
        """(1) MatMulNBits weights unpacked independently == record bit for bit; (2) onnxruntime
        logits vs `simulate()` on text, and prefill + KV-cache decode == one full pass;
        (3) onnxruntime-genai greedy tokens == simulation greedy tokens; tokenizer parity."""
        path = Path(path)
        result: dict[str, Any] = _compare_all_weights(path, record)
        result["fp_tensors_exact"] = _fp_tensors_exact(path, record)
        result["engine"] = None
        result.update({"top1_agreement": None, "kl_mean": None, "tokens_match": None})
        if options.get("engine", True) is False:
            return result
        result.update(_engine_checks(path, record, options))
        return result


# ---- export helpers ------------------------------------------------------------------------------
def _save(model: onnx.ModelProto, out_dir: Path, force_external: bool) -> bool:
    """Write model.onnx; weights go to model.onnx.data when asked or when the proto passes 2 GB."""
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)  # ByteSize() fails past 2 GB
    external = force_external or weight_bytes > _PROTO_LIMIT
    if external:
        onnx.save_model(model, str(out_dir / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(out_dir / MODEL_FILE))
    return external


def _report(record: QuantizedModel, opts: OnnxOptions, notes: list[str], n_nodes: int, external: bool,
            files: list[str], seconds: float) -> dict[str, Any]:
    grids: dict[str, int] = {}
    for qt in record.iter_quantized():
        grids[qt.grid.name] = grids.get(qt.grid.name, 0) + 1
    return {
        "format": "onnx",
        "op": "com.microsoft::MatMulNBits",
        "scheme": record.scheme,
        "family": record.family,
        "options": asdict(opts),
        "grids": grids,
        "matmulnbits_nodes": n_nodes,
        "stored_exactly": "codes, scales and zero points copied without re-rounding; "
                          "scale·(q − zero_point) == the record's dequantized weight bit for bit (checked)",
        "containers": notes or ["codes stored in their own bit width"],
        "unquantized": "embedding, norms, biases and LM head in " + opts.dtype,
        "external_data": external,
        "files": [MODEL_FILE] + ([DATA_FILE] if external else []) + files + [REPORT_FILE],
        "seconds": round(seconds, 2),
    }


def _post_write_check(tmp: Path, record: QuantizedModel) -> None:
    """Before the rename: onnxruntime loads the model and a weight sample unpacks to the record."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(tmp / MODEL_FILE), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any load failure means the export is unusable
        raise VerificationError(f"onnxruntime cannot load the written model: {e}") from None
    json.loads((tmp / GENAI_CONFIG).read_text())
    names = sorted(record.quantized)
    sample = [names[0], names[-1]] if names else []
    got = read_matmulnbits(tmp / MODEL_FILE, sample)
    check = compare_weights({n: record.quantized[n].dequantize() for n in sample}, got)
    if not check["weights_exact"]:
        raise VerificationError(f"written MatMulNBits weights differ from the record: {check}")


def _compare_all_weights(path: Path, record: QuantizedModel) -> dict[str, Any]:
    """`compare_weights` over every MatMulNBits node, one node at a time (bounded memory)."""
    seen: set[str] = set()
    mismatches: dict[str, Any] = {}
    extra: list[str] = []
    for part in iter_matmulnbits(path / MODEL_FILE):
        ref = {n: record.quantized[n].dequantize() for n in part if n in record.quantized}
        c = compare_weights(ref, part)
        mismatches.update(c["mismatches"])
        extra += c["extra_in_file"]
        seen.update(ref)
    missing = sorted(set(record.quantized) - seen)
    return {"weights_exact": not missing and not mismatches and not extra, "tensors_compared": len(seen),
            "missing_in_file": missing, "extra_in_file": extra, "mismatches": mismatches}


def _fp_tensors_exact(path: Path, record: QuantizedModel) -> bool:
    """The unquantized tensors stored under their HF names (embedding, norms, head) equal the
    record's, rounded to the export dtype (fp32: unchanged)."""
    meta = {p.key: p.value for p in onnx.load(str(path / MODEL_FILE), load_external_data=False).metadata_props}
    dt = np.float16 if meta.get("lfq_export.dtype") == "float16" else np.float32
    stored = read_initializers(path / MODEL_FILE, record.fp)
    if "model.embed_tokens.weight" not in stored:
        return False
    return all(np.array_equal(v, record.fp[k].float().numpy().astype(dt)) for k, v in stored.items())


# ---- engine checks ---------------------------------------------------------------------------------
def _read_text_ids(tokenizer: Any, options: dict[str, Any]) -> np.ndarray:
    path = options.get("text") or _default_text()
    max_tokens = int(options.get("max_tokens") or 256)
    with open(path, encoding="utf-8") as f:
        text = f.read(max(4096, max_tokens * 12))
    ids = tokenizer(text)["input_ids"][:max_tokens]
    if len(ids) < 16:
        raise FormatError(f"{path}: fewer than 16 tokens of text for the engine check")
    return np.asarray(ids, np.int64)


def _default_text() -> Path:
    from lfq_export.synthetic import default_tokenizer_dir

    tok = default_tokenizer_dir()
    if tok is not None:
        cand = tok.parents[1] / "text" / "wikitext2_raw_test.txt"
        if cand.is_file():
            return cand
    raise FormatError("no --text given and the WikiText-2 asset was not found")


def _engine_checks(path: Path, record: QuantizedModel, options: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from lfq_export.simulate import simulate

    from .onnx_verify import (DEFAULT_PROMPTS, OrtDecoder, engine_versions, genai_greedy, kv_cache_check,
                              simulate_greedy, simulate_logits, tokenization_parity)

    if record.tokenizer_dir is None:
        raise FormatError("the run has no tokenizer; the engine check needs one (use --no-engine)")
    meta = {p.key: p.value for p in onnx.load(str(path / MODEL_FILE), load_external_data=False).metadata_props}
    exact_mode = (meta.get("lfq_export.dtype", "float32") == "float32"
                  and meta.get("lfq_export.accuracy_level", "0") in ("0", "1"))
    tok = AutoTokenizer.from_pretrained(str(record.tokenizer_dir))
    model = simulate(record)
    ids = _read_text_ids(tok, options)
    dec = OrtDecoder(path)
    logits = compare_logits(simulate_logits(model, ids), dec.logits(ids))
    kv = kv_cache_check(dec, ids[: min(len(ids), 64)], decode_steps=int(options.get("decode_steps", 8)))
    prompts = list(options.get("prompts") or DEFAULT_PROMPTS)
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    n_new = int(options.get("gen_tokens", 32))
    got = genai_greedy(path, prompt_ids, n_new)
    want = simulate_greedy(model, prompt_ids, n_new, special_ids(record)[1])
    div = [first_divergence(a, b) for a, b in zip(got, want)]
    parity = tokenization_parity(path, tok, prompts + [tok.decode(ids[:64], skip_special_tokens=True)])
    res = {
        "engine": engine_versions(),
        "exact_mode": exact_mode,
        "text_tokens": int(len(ids)),
        **{f"logits_{k}" if k in ("tokens", "max_abs_diff", "rel_l2", "kl_max") else k: v for k, v in logits.items()},
        **kv,
        "tokens_match": all(a == b for a, b in zip(got, want)),
        "greedy_prompts": len(prompts),
        "greedy_first_divergence": div,
        "greedy_text_engine": [tok.decode(t) for t in got],
        "greedy_text_simulate": [tok.decode(t) for t in want],
        "tokenizer": parity,
    }
    res["logits_within_tolerance"] = bool(logits["rel_l2"] <= LOGITS_REL_TOL) if exact_mode else None
    res["kv_within_tolerance"] = bool(kv["kv_rel_l2"] <= KV_REL_TOL) if exact_mode else None
    return res
