"""`quantize()`: model + scheme + method → a run directory holding the QuantizedModel record.

Everything that can be checked is checked before any compute: the model (format, architecture,
safety, finite weights), the scheme against the model's shapes and the requested formats, the
calibration source, and the output path. The run is built in a hidden `.NAME.partial` directory next
to the output and renamed when complete; an interrupted run keeps its finished blocks there and
`--resume` continues it with bit-identical results.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .atomic import check_output_path, os_error_message
from .blockwise import BlockResult, BlockRunner, BlockSettings
from .calibration import load_calibration, parse_calib
from .errors import CalibrationError, OptimisationError, OutputError, RecordError, SchemeError
from .formats_api import get_format
from .methods import METHODS, MethodConfig
from .model_io import ModelSource, copy_tokenizer_files, resolve_model
from .record import (
    NONBLOCK_FILE,
    RECORD_VERSION,
    QuantizedModel,
    QuantizedTensor,
    RunStatus,
    block_file,
    read_manifest,
    read_tensors,
    write_manifest,
    write_tensors,
)
from .grids import grid_from_dict
from .schemes import QuantPlan, SchemeContext, plan_quantization

log = logging.getLogger(__name__)

__all__ = ["QuantizeOptions", "METHOD_DEFAULTS", "FINAL_CE_LR_SCALE", "quantize", "prepare", "partial_dir",
           "model_shapes"]

#: per-method defaults, scaled down from the official code for CPU runs (see README):
#: (iters per block, lr, batch size, weight lr)
METHOD_DEFAULTS: dict[str, tuple[int, float, int, float]] = {
    "rtn": (0, 0.0, 1, 0.0),
    # official: 20 epochs × 128 samples (2560 steps), lwc_lr 1e-2, AdamW wd 0 → 5× the lr for 100 steps
    "omniquant": (100, 5e-2, 2, 0.0),
    # official: 5000 iters, w_lr 3e-3 (W4) / 2.5e-3 (W3), Adam, cosine → ~3× the lr for 100 steps
    "flexround": (100, 1e-2, 2, 0.0),
    # official: 2 epochs × 4096 samples, quant_lr 1e-4, weight_lr 1e-5 → 30× both for 100 steps
    "blockap": (100, 3e-3, 2, 3e-4),
}

#: lr of the LFQ (soft-CE) final block relative to the method's block lr, unless --final-lr is given.
#: Measured with `tools/profile_final_block.py --trajectory` on SmolLM2-135M W4 (held-out KL through the
#: head, 50 iters): FlexRound 1e-2 → 0.272, 3e-3 → 0.240; Block-AP 3e-3 → 0.271, 1e-3 → 0.265; OmniQuant's
#: clipping logits need its full lr (5e-2 → 0.366, 1.5e-2 → 0.395). The CE gradient through the head is
#: sharper than the block MSE's; the peer run T1 likewise lowered the LFQ block's lr (2e-3 against 1e-2).
FINAL_CE_LR_SCALE: dict[str, float] = {"rtn": 1.0, "omniquant": 1.0, "flexround": 0.3, "blockap": 1 / 3}

_SETTINGS_IGNORED_ON_RESUME = ("resume", "overwrite", "progress", "offload_dir", "device", "export_options")
#: settings that only affect the last block: a resumed run may change them while that block is unfinished
_FINAL_BLOCK_SETTINGS = ("final_loss", "final_iters", "final_lr", "ce_token_fraction", "teacher_cache_gb",
                         "stop_after_block")
#: schedule settings a resumed run may change (e.g. a lower lr after a NaN); recorded in the report
_SCHEDULE_SETTINGS = ("iters", "lr", "final_iters", "final_lr", "batch_size", "weight_lr", "compute_dtype",
                      "act_dtype", "ce_chunk_tokens", "ce_token_fraction", "teacher_cache_gb")


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything `lfq-export quantize` accepts besides the model and the output path."""

    scheme: str = "w4g128"
    method: str = "rtn"
    final_loss: str = "ce"
    formats: tuple[str, ...] = ()
    calib: str | None = None
    calib_field: str = "text"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    iters: int | None = None
    lr: float | None = None
    final_iters: int | None = None
    final_lr: float | None = None
    batch_size: int | None = None
    weight_lr: float | None = None
    rtn_search: bool = False
    keep_head_fp: bool = False
    skip_unquantizable: bool = False
    act_dtype: str = "float32"
    compute_dtype: str = "auto"  # bf16 where the hardware has bf16 matmuls, else fp32
    offload_dir: str | None = None
    device: str = "cpu"
    ce_chunk_tokens: int | None = None  # None: auto (one chunk's logits under 24 MB)
    ce_token_fraction: float | None = None  # None: auto (head cost ≈ block cost)
    teacher_cache_gb: float = 4.0
    allow_pickle: bool = False
    trust_remote_code: bool = False
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    stop_after_block: int | None = None
    export_options: dict[str, Any] = field(default_factory=dict)

    def block_settings(self) -> BlockSettings:
        iters, lr, bs, wlr = METHOD_DEFAULTS[self.method]
        base = MethodConfig(
            iters=iters if self.iters is None else self.iters,
            lr=lr if self.lr is None else self.lr,
            batch_size=bs if self.batch_size is None else self.batch_size,
            weight_lr=wlr if self.weight_lr is None else self.weight_lr,
            rtn_search=self.rtn_search,
        )
        final_lr = base.lr * (FINAL_CE_LR_SCALE[self.method] if self.final_loss == "ce" else 1.0)
        final = replace(base,
                        iters=base.iters if self.final_iters is None else self.final_iters,
                        lr=final_lr if self.final_lr is None else self.final_lr)
        return BlockSettings(
            method=self.method, final_loss=self.final_loss, block_cfg=base, final_cfg=final, seed=self.seed,
            ce_chunk_tokens=self.ce_chunk_tokens,
            compute_dtype=_dtype(resolve_compute_dtype(self.compute_dtype, self.device)),
            teacher_cache_gb=self.teacher_cache_gb, ce_token_fraction=self.ce_token_fraction,
        )

    def fingerprint(self) -> dict[str, Any]:
        """The settings that determine the codes (compared on --resume)."""
        d = asdict(self)
        for k in _SETTINGS_IGNORED_ON_RESUME:
            d.pop(k, None)
        d["formats"] = list(d["formats"])
        return d


def native_bf16(device: str) -> bool:
    """True where bf16 matmuls run in hardware: CUDA GPUs with bf16, x86 CPUs with AVX-512-BF16 or AMX.
    Elsewhere torch emulates them: a bf16 matmul was 7.5× slower than fp32 on an AVX2-only EPYC
    (and 2-3× faster on an AVX-512-BF16 Xeon). auto-round makes the same check."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's CPUID checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_compute_dtype(name: str, device: str) -> str:
    """`auto` → `bfloat16` on hardware with native bf16 matmuls, `float32` elsewhere."""
    if name != "auto":
        _dtype(name)
        return name
    return "bfloat16" if native_bf16(device) else "float32"


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise SchemeError(f"dtype {name!r} not one of {', '.join(table)}")
    return table[name]


def partial_dir(out: Path) -> Path:
    """Where an unfinished run lives (hidden, next to the final run directory)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def model_shapes(source: ModelSource) -> dict[str, tuple[int, int]]:
    """`(out, in)` of every block linear and of the embedding/head, from the checkpoint headers."""
    shapes = {}
    names = source.adapter.linear_names(source.n_layers)
    a = source.adapter
    for mod in names + [a.embedding, a.lm_head]:
        t = f"{mod}.weight"
        if t not in source.weight_map and mod == a.lm_head:
            t = f"{a.embedding}.weight"
        if t not in source.weight_map:
            raise SchemeError(f"{source.origin}: {t} missing from the checkpoint")
        shard = source._handle(source.weight_map[t])
        shape = shard.get_slice(t).get_shape()
        shapes[mod] = (int(shape[0]), int(shape[1]))
    return shapes


@dataclass
class Prepared:
    """The checked inputs of a run (nothing computed yet)."""

    source: ModelSource
    plan: QuantPlan
    options: QuantizeOptions
    out: Path
    work: Path


def prepare(model: str, out: Path | str, options: QuantizeOptions) -> Prepared:
    """All up-front checks. Raises an `LfqError` naming the problem; writes nothing."""
    out = Path(out)
    if options.method not in METHODS:
        raise SchemeError(f"unknown method {options.method!r}; known: {', '.join(sorted(METHODS))}")
    if options.ce_token_fraction is not None and not 0.0 < options.ce_token_fraction <= 1.0:
        raise SchemeError(f"--ce-token-fraction must be in (0, 1], not {options.ce_token_fraction}")
    if options.ce_chunk_tokens is not None and options.ce_chunk_tokens < 1:
        raise SchemeError(f"--ce-chunk-tokens must be a positive number of tokens, not {options.ce_chunk_tokens}")
    if options.final_loss not in ("ce", "mse"):
        raise SchemeError(f"--final-loss must be ce or mse, not {options.final_loss!r}")
    _dtype(options.act_dtype)
    # the run records the dtype it used, so the fingerprint names it rather than `auto`
    options = replace(options, compute_dtype=resolve_compute_dtype(options.compute_dtype, options.device))
    for f in options.formats:
        get_format(f)
    work = partial_dir(out)
    if options.resume:
        if not work.is_dir() and not out.is_dir():
            raise RecordError(f"{out}: nothing to resume (no {work.name}); run without --resume")
    else:
        check_output_path(out, options.overwrite)
        if work.exists() and not options.overwrite:
            raise OutputError(f"{out}: an interrupted run exists ({work.name}); pass --resume to continue it "
                              "or --overwrite to start over")
    if options.method != "rtn" or options.calib is not None:
        if options.calib is None:
            raise CalibrationError(f"--method {options.method} needs calibration data: pass --calib FILE, "
                                   "a dataset name:split, or 'self'")
        parse_calib(options.calib, options.calib_field)
    source = resolve_model(model, allow_pickle=options.allow_pickle, trust_remote_code=options.trust_remote_code)
    ctx = SchemeContext(source.adapter, source.config, model_shapes(source), options.keep_head_fp)
    plan = plan_quantization(options.scheme, ctx, options.formats, options.skip_unquantizable)
    for f in options.formats:
        get_format(f).preflight(source.config.to_dict(), source.path, options.export_options)
    source.check_finite()
    return Prepared(source, plan, options, out, work)


def quantize(model: str, out: Path | str, options: QuantizeOptions = QuantizeOptions()) -> Path:
    """Quantize `model` into the run directory `out` and export the requested formats.

    Returns the run directory. Interrupted runs leave `.OUT.partial` for `--resume`."""
    p = prepare(model, out, options)
    t_start = time.perf_counter()
    if options.resume and p.out.is_dir() and not p.work.exists():
        read_manifest(p.out)  # a finished run: nothing to do but exports
        log.info("%s is already complete", p.out)
    else:
        try:
            complete = _run(p)
        except (OutputError, OptimisationError) as e:
            if p.work.is_dir():  # keep finished blocks for --resume, and say so
                raise type(e)(f"{e}; finished blocks are kept in {p.work}: run the same command with --resume "
                              "(or --overwrite to start over)") from None
            raise
        if not complete:
            log.info("stopped after block %d: %s holds the finished blocks; continue with --resume",
                     options.stop_after_block, p.work)
            return p.work
        _finish(p, time.perf_counter() - t_start)
    record = QuantizedModel.load(p.out)
    for fmt_name in options.formats:
        fmt = get_format(fmt_name)
        dest = p.out / fmt.default_output_name(record)
        fmt.export(record, dest, {**options.export_options, "overwrite": True})
    return p.out


# ---- the run ---------------------------------------------------------------------------------
def _start_or_resume(p: Prepared) -> tuple[dict[str, Any], dict[int, dict[str, QuantizedTensor]]]:
    """Create the work directory, or load the finished blocks of an interrupted run."""
    opts = p.options
    if opts.resume and p.work.is_dir():
        manifest = read_manifest(p.work)
        old, new = manifest["report"].get("settings", {}), _jsonable(opts.fingerprint())
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        done_blocks = {b["index"] for b in manifest["report"]["blocks"]}
        final_open = p.source.n_layers - 1 not in done_blocks
        fixed = [k for k in changed
                 if k not in _SCHEDULE_SETTINGS and not (final_open and k in _FINAL_BLOCK_SETTINGS)]
        if fixed:
            raise RecordError(f"{p.work}: was started with different settings ({', '.join(fixed)}); resume with the "
                              "same command, or pass --overwrite to start over")
        done = _load_done_blocks(p.work, manifest)
        if changed:
            log.warning("resuming with a changed schedule (%s) from block %d", ", ".join(changed), len(done))
            manifest["report"].setdefault("resumed_with_changes", []).append(
                {"from_block": len(done), "changes": {k: [old.get(k), new.get(k)] for k in changed}})
            manifest["report"]["settings"] = new
        return manifest, done
    if p.work.exists():
        shutil.rmtree(p.work)
    try:
        (p.work / "blocks").mkdir(parents=True)
        copy_tokenizer_files(p.source, p.work / "tokenizer")
    except OSError as e:
        shutil.rmtree(p.work, ignore_errors=True)
        raise OutputError(os_error_message(e, p.out)) from None
    config = p.source.config.to_dict()
    manifest = {
        "record_version": RECORD_VERSION,
        "status": RunStatus.QUANTIZING.value,
        "family": p.source.adapter.family,
        "scheme": opts.scheme,
        "formats": list(opts.formats),
        "config": config,
        "quantized": {},
        "report": {
            "lfq_export_version": __version__,
            "model": p.source.origin,
            "settings": _jsonable(opts.fingerprint()),
            "plan": {"grids": {n: g.name for n, g in p.plan.grids.items()}, "notes": list(p.plan.notes)},
            "kept_fp": dict(p.plan.kept_fp),
            "blocks": [],
        },
    }
    write_manifest(p.work, manifest)
    return manifest, {}


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))


def _load_done_blocks(work: Path, manifest: dict[str, Any]) -> dict[int, dict[str, QuantizedTensor]]:
    done: dict[int, dict[str, QuantizedTensor]] = {}
    for entry in manifest["report"]["blocks"]:
        k = entry["index"]
        f = work / block_file(k)
        if not f.is_file():
            continue
        tensors = read_tensors(f)
        block = {}
        for name, meta in manifest["quantized"].items():
            if f"q.{name}.codes" in tensors:
                grid = grid_from_dict(meta["grid"])
                codes = tensors[f"q.{name}.codes"]
                params = {k2: tensors[f"q.{name}.{k2}"] for k2 in grid.param_spec(*codes.shape)}
                block[name] = QuantizedTensor(name, grid, codes, params, meta.get("orig_dtype", "float32"))
        done[k] = block
    return done


def _run(p: Prepared) -> bool:
    """Quantize the blocks and the non-block tensors; False if stopped early (--stop-after-block)."""
    opts = p.options
    # calibration problems (too short, bad field) surface here, before anything is written
    calib = _calibration(p) if opts.calib is not None and opts.method != "rtn" else None
    manifest, done = _start_or_resume(p)
    n = p.source.n_layers
    grids_by_block = {k: p.plan.block_grids(p.source.adapter.block_prefix(k)) for k in range(n)}
    runner = BlockRunner(p.source, opts.block_settings(), act_dtype=_dtype(opts.act_dtype),
                         offload_dir=opts.offload_dir, device=opts.device, progress=opts.progress)

    def on_block_done(k: int, result: BlockResult) -> None:
        prefix = p.source.adapter.block_prefix(k)
        tensors: dict[str, torch.Tensor] = {}
        for qt in result.quantized.values():
            tensors.update(qt.tensors())
            manifest["quantized"][qt.name] = {"grid": qt.grid.to_dict(), "shape": list(qt.shape),
                                              "orig_dtype": qt.orig_dtype}
        tensors.update({f"fp.{k2}": v for k2, v in result.fp.items() if k2.startswith(prefix)})
        write_tensors(p.work / block_file(k), tensors)
        manifest["report"]["blocks"] = [b for b in manifest["report"]["blocks"] if b["index"] != k] + [result.report]
        write_manifest(p.work, manifest)

    runner.run(calib, grids_by_block, done, on_block_done, stop_after=opts.stop_after_block)
    if opts.stop_after_block is not None and opts.stop_after_block < n - 1:
        return False
    _write_nonblock(p, manifest)
    return True


def _calibration(p: Prepared) -> torch.Tensor:
    opts = p.options
    spec = parse_calib(opts.calib, opts.calib_field)
    tok = p.source.tokenizer()
    model = p.source.load_model() if spec.kind == "self" else None
    ids = load_calibration(spec, tok, opts.nsamples, opts.seqlen, opts.seed, model=model)
    del model
    return ids


def _write_nonblock(p: Prepared, manifest: dict[str, Any]) -> None:
    """Embedding, final norm and head: FP, or RTN in their grid when the scheme quantizes them."""
    src, a = p.source, p.source.adapter
    head_grids = p.plan.head_grids(a)
    tensors: dict[str, torch.Tensor] = {}
    qnames = set()
    for mod, grid in head_grids.items():
        w = src.tensor(f"{mod}.weight")
        params = grid.init_params(w.float(), search=True)
        codes = grid.quantize(w.float(), params)
        qt = QuantizedTensor(mod, grid, codes, grid.to_storage(params, *codes.shape), str(w.dtype).replace("torch.", ""))
        tensors.update(qt.tensors())
        manifest["quantized"][mod] = {"grid": grid.to_dict(), "shape": list(qt.shape), "orig_dtype": qt.orig_dtype}
        qnames.add(f"{mod}.weight")
    for name in src.non_block_names():
        if name not in qnames:
            tensors[f"fp.{name}"] = src.tensor(name)
    write_tensors(p.work / NONBLOCK_FILE, tensors)
    write_manifest(p.work, manifest)


def _finish(p: Prepared, seconds: float) -> None:
    manifest = read_manifest(p.work)
    manifest["status"] = RunStatus.COMPLETE.value
    manifest["report"]["blocks"].sort(key=lambda b: b["index"])
    manifest["report"]["timings"] = {"total_seconds": round(seconds, 2)}
    manifest["report"]["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    write_manifest(p.work, manifest)
    QuantizedModel.load(p.work)  # the record must load whole before it is published
    if p.out.exists():
        if not p.options.overwrite:
            raise OutputError(f"{p.out}: already exists; pass --overwrite to replace it")
        shutil.rmtree(p.out)
    p.work.rename(p.out)
