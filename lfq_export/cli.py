"""The `lfq-export` command line: a thin layer that parses arguments and calls the Python API.

Errors a user can cause print one line (`error: ...`) and exit 2; `--debug` shows the traceback.
An interrupted `quantize` (Ctrl-C, SIGTERM) exits 130 and prints how to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

log = logging.getLogger("lfq_export")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "torch.utils._pytree", "transformers", "datasets", "gptqmodel", "logbar"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---- arguments ---------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _add_format_options(p: argparse.ArgumentParser) -> None:
    from .formats_api import get_format, registered_formats

    before = {a.dest for a in p._actions}
    for name in registered_formats():
        group = p.add_argument_group(f"{name} options")
        get_format(name).add_cli_options(group)
    p.set_defaults(_format_dests=sorted({a.dest for a in p._actions} - before))


def _add_quantize(sub) -> None:
    from .quantize import METHOD_DEFAULTS

    p = sub.add_parser(
        "quantize",
        help="quantize a model into a run directory (and optionally export it)",
        description="Quantize MODEL with a scheme and a method into RUN_DIR (the QuantizedModel record). "
        "Blocks 0..L-2 minimise block-output MSE; with a learnable method the last block minimises the LFQ "
        "soft cross-entropy through the final norm and the frozen LM head (--final-loss ce, the default). "
        "Method defaults (iters/lr/batch per block): "
        + "; ".join(f"{m}: {it}/{lr:g}/{bs}" for m, (it, lr, bs, _) in METHOD_DEFAULTS.items()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="HF model directory (safetensors), a .gguf file (or a directory holding one), or a hub id")
    p.add_argument("--out", required=True, type=Path, help="run directory to create")
    p.add_argument("--scheme", default="w4g128", help="quantization scheme (see `lfq-export schemes`)")
    p.add_argument("--method", default="rtn", choices=sorted(METHOD_DEFAULTS), help="block quantization method")
    p.add_argument("--final-loss", default="ce", choices=["ce", "mse"],
                   help="loss of the last block: ce = LFQ soft cross-entropy via the LM head; mse = base method")
    p.add_argument("--format", dest="formats", action="append", default=[], metavar="FORMAT",
                   help="export format(s) the grids must be exact in; exported into RUN_DIR after quantization "
                   "(repeatable: gguf, gptq, awq, compressed-tensors, onnx)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default=None,
                   help="calibration text: FILE.txt (blank-line separated), FILE.jsonl, dataset name[:config]:split, "
                   "or 'self' (sampled from the FP model). Required for learnable methods")
    c.add_argument("--calib-field", default="text", help="JSON field(s) holding the text (comma-separated are joined)")
    c.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    c.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence")
    c.add_argument("--seed", type=int, default=0, help="seed for sampling data and batches")
    o = p.add_argument_group("optimisation")
    o.add_argument("--iters", type=int, default=None, help="steps per block (default: the method's)")
    o.add_argument("--lr", type=float, default=None, help="learning rate of every block (default: the method's)")
    o.add_argument("--final-iters", type=int, default=None, help="steps of the last block (default: --iters)")
    o.add_argument("--final-lr", type=float, default=None,
                   help="learning rate of the last block (default: --lr; with --final-loss ce 0.3× it for "
                   "flexround and blockap, whose CE block does better with a lower lr)")
    o.add_argument("--batch-size", type=int, default=None, help="calibration sequences per step")
    o.add_argument("--weight-lr", type=float, default=None, help="Block-AP: learning rate of the weights")
    o.add_argument("--rtn-search", action="store_true", help="RTN: search the clipping that minimises weight MSE")
    o.add_argument("--ce-chunk-tokens", type=int, default=None,
                   help="tokens per logit chunk in the LFQ loss (default: as many as keep one chunk's fp32 logits "
                   "under 24 MB, 32..1024: 128 for a 49k vocabulary, 32 for 152k; larger chunks are allocated "
                   "fresh from the kernel every time and run 3-5x slower here)")
    o.add_argument("--ce-token-fraction", type=_fraction_or_auto, default=None, metavar="F|auto",
                   help="LFQ block: random fraction of each batch's tokens sent through the head each step (an "
                   "unbiased estimate of the loss). auto (default): as many tokens as make the head's matmuls 3/4 of "
                   "the block's, i.e. min(1, 0.75 x block weights / head weights) — 9.4%% for SmolLM2, ~30%% for "
                   "Llama-3-8B — so the LFQ block costs at most about 2 MSE blocks; 1 = every token")
    o.add_argument("--teacher-cache-gb", type=float, default=4.0,
                   help="LFQ block: cache the FP model's log-probs of calibration tokens up to this size (0: off)")
    o.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype of every block forward: optimisation steps, propagation of the calibration "
                   "activations, evaluation, LFQ logits. auto (default): bfloat16 where the hardware has bf16 "
                   "matmuls (AVX-512-BF16/AMX CPUs: 2-3x faster than fp32; CUDA GPUs with bf16), float32 elsewhere "
                   "(an AVX2 CPU emulates bf16 7x slower than fp32). Norms and softmax stay fp32; the exported "
                   "weights are exact either way")
    s = p.add_argument_group("model handling")
    s.add_argument("--keep-head-fp", action="store_true", help="keep embedding and LM head in FP (GGUF mixes quantize them)")
    s.add_argument("--skip-unquantizable", action="store_true",
                   help="keep tensors whose shape the grid cannot tile in FP (listed in the report) instead of refusing")
    s.add_argument("--act-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of cached activations")
    s.add_argument("--offload-dir", default=None, help="keep cached activations in memory-mapped files here")
    s.add_argument("--device", default="cpu", help="cpu, or cuda when a GPU is present")
    s.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights: only for trusted models")
    s.add_argument("--trust-remote-code", action="store_true", help="allow models that ship their own code")
    s.add_argument("--overwrite", action="store_true", help="replace RUN_DIR (and an interrupted run) if present")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run at its first unfinished block")
    s.add_argument("--stop-after-block", type=int, default=None, metavar="K",
                   help="quantize blocks 0..K and stop (continue later with --resume; the last block's settings "
                   "— --final-loss, --final-iters, --final-lr — may then still change, e.g. to compare them)")
    _add_format_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_quantize)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="quality of a run against the FP model",
        description="Perplexity (FP and quantized), mean KL(FP||Q) per token and top-1 agreement on a text; with "
        "--prompts, KL and agreement by position on FP-greedy generations and the length of the greedy prefix "
        "the quantized model reproduces.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--fp", default=None, help="FP model (default: the model the run was made from)")
    p.add_argument("--text", required=True, type=Path, help="evaluation text file (e.g. WikiText-2 raw test)")
    p.add_argument("--max-tokens", type=int, default=16384, help="evaluate on at most this many tokens")
    p.add_argument("--seqlen", type=int, default=512, help="window length for perplexity")
    p.add_argument("--prompts", type=Path, default=None, help="prompt file: one prompt per line, or .jsonl with 'prompt'")
    p.add_argument("--gen-tokens", type=int, default=256, help="tokens generated greedily by the FP model per prompt")
    p.add_argument("--max-prompts", type=int, default=None, help="use at most this many prompts")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--json", dest="json_out", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="PNG of KL by generation position (default: next to --json)")
    _add_common(p)
    p.set_defaults(func=cmd_eval)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="summarise a run directory", description="Show a run's model, scheme, "
                       "grids, per-block losses and timings.")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the manifest as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_info)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run as an engine format",
                       description="Pack a run's codes and parameters into FORMAT without re-rounding anything.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--format", required=True, help="gguf, gptq, awq, compressed-tensors or onnx")
    p.add_argument("--out", required=True, type=Path, help="output file (gguf) or directory")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_format_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_export)


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="prove an export matches its run",
                       description="Read every tensor of an export back with an independent reader and compare it "
                       "bit for bit with the run's simulated weights; then run the real engine and compare its logits "
                       "with simulate() (top-1 agreement, KL) and its tokenization and greedy text.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", type=Path, help="exported file or directory")
    p.add_argument("--run", required=True, type=Path, help="run directory the export was made from")
    p.add_argument("--json", dest="json_out", type=Path, default=None, help="write the result as JSON here")
    p.add_argument("--no-engine", dest="engine", action="store_false", help="check weights only")
    p.add_argument("--text", type=Path, default=None, help="text for engine logits (default: WikiText-2 from shared assets)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens of text fed to the engine")
    _add_common(p)
    p.set_defaults(func=cmd_verify)


def _add_schemes(sub) -> None:
    p = sub.add_parser("schemes", help="list schemes and the formats that hold each exactly",
                       description="Print every scheme name (affine w<bits>[g<group>][-sym] and the GGUF types and "
                       "llama-quantize mixes) as a markdown table with one column per export format: 'yes' where "
                       "the format stores the scheme's grids exactly. quantize and export refuse the other cells "
                       "before any compute.")
    _add_common(p)
    p.set_defaults(func=cmd_schemes)


def _fraction_or_auto(v: str) -> float | None:
    if v == "auto":
        return None
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'auto', not {v!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="lfq-export",
        description="LFQ post-training quantization of Hugging Face decoder LLMs, exported losslessly to GGUF, "
        "GPTQ, AWQ, compressed-tensors and ONNX MatMulNBits.",
    )
    parser.add_argument("--version", action="version", version=f"lfq-export {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_quantize, _add_eval, _add_info, _add_export, _add_verify, _add_schemes):
        add(sub)
    return parser


# ---- commands ----------------------------------------------------------------------------------
def _format_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options the format modules declared (their `add_cli_options`)."""
    return {k: getattr(args, k) for k in getattr(args, "_format_dests", [])}


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import QuantizeOptions, quantize

    if args.device != "cpu":
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            from .errors import LfqError

            raise LfqError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
    opts = QuantizeOptions(
        scheme=args.scheme, method=args.method, final_loss=args.final_loss, formats=tuple(args.formats),
        calib=args.calib, calib_field=args.calib_field, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        iters=args.iters, lr=args.lr, final_iters=args.final_iters, final_lr=args.final_lr,
        batch_size=args.batch_size, weight_lr=args.weight_lr, rtn_search=args.rtn_search,
        keep_head_fp=args.keep_head_fp, skip_unquantizable=args.skip_unquantizable, act_dtype=args.act_dtype,
        compute_dtype=args.compute_dtype, offload_dir=args.offload_dir, device=args.device,
        ce_chunk_tokens=args.ce_chunk_tokens, ce_token_fraction=args.ce_token_fraction,
        teacher_cache_gb=args.teacher_cache_gb, allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code, overwrite=args.overwrite, resume=args.resume,
        progress=args.progress, stop_after_block=args.stop_after_block, export_options=_format_options(args),
    )
    out = quantize(args.model, args.out, opts)
    if out != args.out:
        print(f"stopped after block {args.stop_after_block}; continue with the same command and --resume")
    else:
        print(f"wrote {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalOptions, evaluate_run

    result = evaluate_run(args.run, EvalOptions(
        fp_model=args.fp, text=args.text, max_tokens=args.max_tokens, seqlen=args.seqlen, prompts=args.prompts,
        gen_tokens=args.gen_tokens, max_prompts=args.max_prompts, chat=args.chat, progress=args.progress),
        json_out=args.json_out, plot=args.plot)
    keys = ("ppl_fp", "ppl", "kl_mean", "top1_agreement", "gen_prefix_match_mean", "gen_kl_mean")
    print(" ".join(f"{k}={result[k]:.4g}" for k in keys if k in result))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import describe_run

    print(describe_run(args.run, as_json=args.as_json))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    path = export_run(args.run, args.format, args.out, {**_format_options(args), "overwrite": args.overwrite})
    print(f"wrote {path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .export import verify_export

    result = verify_export(args.path, args.run, {"engine": args.engine, "text": args.text,
                                                  "max_tokens": args.max_tokens, "progress": args.progress},
                           json_out=args.json_out)
    keys = ("weights_exact", "engine", "top1_agreement", "kl_mean", "tokens_match")
    print(" ".join(f"{k}={result.get(k)}" for k in keys))
    return 0 if result.get("weights_exact") else 1


def cmd_schemes(args: argparse.Namespace) -> int:
    from .export import SCHEMES_FOOTNOTE, schemes_table

    print(schemes_table())
    print(f"\n{SCHEMES_FOOTNOTE}")
    return 0


# ---- entry point -------------------------------------------------------------------------------
def _on_sigterm(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from .errors import LfqError

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except LfqError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        if args.command == "quantize":
            again = " ".join(shlex.quote(a) for a in argv if a not in ("--resume", "--overwrite"))
            print(f"interrupted: finished blocks are kept; resume with: lfq-export {again} --resume", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
