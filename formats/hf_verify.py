"""Verification of the HF-directory exports (GPTQ, AWQ, compressed-tensors) against their run.

1. Weights: every tensor read back by the independent `unpack_hf` reader equals
   `record.dequantized_state_dict()` bit for bit (quantized linears decoded, the rest as stored).
2. Engine: transformers loads the directory with its real loader on CPU in float32 (GPTQ and AWQ
   through optimum + gptqmodel's torch kernels, compressed-tensors through its own decompressor),
   runs the text, and its logits are compared with `simulate(record)`.
   The control is the loader's own dequantization of every quantized linear: widened to float32 it
   must equal the record exactly; as the loader holds it, it is either the record itself or the
   record rounded once to fp16 (fp16 scales). That measured fact picks the *arithmetic reference*
   — `simulate()` with the weights (and biases) the loader really holds — and the engine must match
   it within the loader's arithmetic: `adapter.engine_rel_tol · max |logit|` (fp32 activations:
   1e-5; gptqmodel's AWQ kernel computes in fp16: 1e-2). Top-1 agreement and KL are reported
   against the exact simulation.
3. Tokens: the directory's tokenizer tokenizes the text exactly like the record's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lfq_export.compare import compare_logits, compare_weights
from lfq_export.errors import VerificationError
from lfq_export.record import QuantizedModel
from lfq_export.simulate import simulate

from .unpack_hf import iter_unpacked, open_checkpoint

__all__ = ["verify_hf", "run_engine", "reference_state", "loader_control", "default_text", "text_ids"]


def verify_hf(adapter: Any, path: Path, record: QuantizedModel, options: Mapping[str, Any]) -> dict[str, Any]:
    """The `verify` result of one HF-directory export (`options`: engine, text, max_tokens, compile)."""
    result: dict[str, Any] = {"format": adapter.name}
    weights = compare_weights(reference_state(record), dict(iter_unpacked(open_checkpoint(path))))
    result["weights_exact"] = weights["weights_exact"]
    result["weights"] = weights
    ids, tokens = text_ids(record, path, options)
    result.update(tokens)
    if options.get("engine", True) is False:
        result.update(engine=None, top1_agreement=None, kl_mean=None)
        return result
    result.update(run_engine(adapter, path, record, ids, dict(options)))
    return result


def run_engine(adapter: Any, path: Path, record: QuantizedModel, ids: torch.Tensor,
               options: dict[str, Any]) -> dict[str, Any]:
    """Load with transformers, run the text, and compare with the simulation and the control."""
    details: dict[str, Any] = {}
    # gptqmodel wraps its dequantizers in torch.compile; compiling costs ~1 s per module shape on
    # CPU and does not change an elementwise s·(q − z). Eager unless options["compile"].
    compile_ok = bool(options.get("compile", False))
    with torch._dynamo.config.patch(disable=not compile_ok), torch.no_grad():
        engine = adapter.load_engine(path, record, details)
        out = engine(ids).logits[0].float()
        control = loader_control(record, lambda name: adapter.loader_weight(engine.get_submodule(name), name, path),
                                 lambda name: getattr(engine.get_submodule(name), "bias", None))
    del engine
    details["torch_compile"] = compile_ok
    native_exact = control["native_max_abs_diff"] == 0.0 and control["biases"] in (None, "exact")
    ref_model = simulate(record)
    with torch.no_grad():
        ref = ref_model(ids).logits[0].float()
        # the loader's arithmetic reference: simulate() with the weights the loader really holds
        # (the control says which: the record itself, or the record rounded once to fp16)
        arith_ref = ref
        if not native_exact:
            _round_quantized_to_fp16(ref_model, record, biases=control["biases"] == "fp16")
            arith_ref = ref_model(ids).logits[0].float()
    del ref_model
    vs_sim = compare_logits(ref, out)
    vs_arith = compare_logits(arith_ref, out)
    tol = adapter.engine_rel_tol * float(arith_ref.abs().max())
    control_ok = (control["exact_fp32"] and (native_exact or control["native_equals_fp16_rounded"])
                  and control["biases"] != "differ")
    return {
        "engine": adapter.engine_name,
        "top1_agreement": vs_sim["top1_agreement"],
        "kl_mean": vs_sim["kl_mean"],
        "max_abs_diff": vs_sim["max_abs_diff"],
        "tokens": vs_sim["tokens"],
        "control_exact": control["exact_fp32"],
        "control": control,
        "arithmetic_reference": "simulate()" if native_exact else "simulate() with quantized weights rounded to fp16",
        "vs_arithmetic_reference": vs_arith,
        "tolerance": {"what": "max |engine − arithmetic reference| ≤ rel_tol · max |logit|",
                      "rel_tol": adapter.engine_rel_tol, "abs": tol},
        "within_tolerance": bool(control_ok and vs_arith["max_abs_diff"] <= tol),
        **details,
    }


def reference_state(record: QuantizedModel) -> dict[str, torch.Tensor]:
    """The record's float32 state dict as the directory should hold it (no tied LM head)."""
    sd = record.dequantized_state_dict()
    if record.tied:
        sd.pop("lm_head.weight", None)
    return sd


def _round_quantized_to_fp16(model: torch.nn.Module, record: QuantizedModel, biases: bool) -> None:
    """Round every quantized linear's weight (and bias, if the loader holds fp16 biases) once to
    fp16: what loaders that dequantize into fp16 (GPTQModel's torch kernels, compressed-tensors
    with fp16 scales) compute with."""
    for name in record.quantized:
        mod = model.get_submodule(name)
        tensors = [mod.weight] + ([mod.bias] if biases and mod.bias is not None else [])
        for t in tensors:
            t.data = t.data.to(torch.float16).to(torch.float32)


def loader_control(record: QuantizedModel, loader_weight: Callable[[str], Any],
                   loader_bias: Callable[[str], torch.Tensor | None]) -> dict[str, Any]:
    """The loader's own dequantized weights against the record: exact in float32, and, for
    loaders that dequantize in fp16, exact against the record rounded once to fp16. Biases of
    quantized linears likewise (`biases`: "exact", "fp16" — GPTQModel keeps them in fp16 —, or
    "differ"; None when the model has none)."""
    exact32 = exact16 = True
    worst = 0.0
    n = 0
    dtypes = set()
    for name, qt in record.quantized.items():
        got = loader_weight(name)
        if got is None:
            raise VerificationError(f"{name}: the loader did not build a quantized module for it")
        if isinstance(got, tuple):  # (fp32-widened dequant, native dequant)
            wide, native = got
        else:
            wide = native = got
        ref = qt.dequantize()
        dtypes.add(str(native.dtype).replace("torch.", ""))
        exact32 &= torch.equal(wide.float(), ref)
        exact16 &= torch.equal(native.to(torch.float16), ref.to(torch.float16))
        worst = max(worst, float((native.float() - ref).abs().max()))
        n += 1
    return {"modules": n, "exact_fp32": exact32, "native_dtype": sorted(dtypes),
            "native_equals_fp16_rounded": exact16, "native_max_abs_diff": worst,
            "biases": _bias_control(record, loader_bias)}


def _bias_control(record: QuantizedModel, loader_bias: Callable[[str], torch.Tensor | None]) -> str | None:
    kinds = set()
    for name in record.quantized:
        ref = record.fp.get(f"{name}.bias")
        if ref is None:
            continue
        got = loader_bias(name)
        ref = ref.float()
        if got is not None and torch.equal(got.float(), ref):
            kinds.add("exact")
        elif got is not None and torch.equal(got.float(), ref.to(torch.float16).float()):
            kinds.add("fp16")
        else:
            kinds.add("differ")
    if not kinds:
        return None
    return "differ" if "differ" in kinds or len(kinds) > 1 else kinds.pop()


# ---- text and tokenizers -------------------------------------------------------------------------
def default_text() -> Path | None:
    """WikiText-2 test from the shared assets (`LFQ_SHARED_ASSETS`, else a `shared/assets` above the repo)."""
    rel = Path("text") / "wikitext2_raw_test.txt"
    env = os.environ.get("LFQ_SHARED_ASSETS")
    cands = [Path(env) / rel] if env else []
    for parent in Path(__file__).resolve().parents:
        cands += [parent / "shared" / "assets" / rel]
    return next((c for c in cands if c.is_file()), None)


def text_ids(record: QuantizedModel, path: Path, options: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token ids `[1, T]` of the verification text (record's tokenizer) and whether the directory's
    tokenizer produces exactly the same ids."""
    from transformers import AutoConfig, AutoTokenizer

    max_tokens = int(options.get("max_tokens") or 256)
    src = options.get("text") or default_text()
    if src is None:
        raise VerificationError("no verification text: pass --text FILE "
                                "(WikiText-2 was not found in the shared assets)")
    text = Path(src).read_text(encoding="utf-8", errors="replace")[: max_tokens * 16]
    if record.tokenizer_dir is None:
        raise VerificationError("the run has no tokenizer files; cannot tokenize the verification text")
    # with the model's config, as from the original model directory: transformers 5 picks the
    # tokenizer class from config.model_type when there is one (e.g. Qwen2Tokenizer over a
    # tokenizer_config.json that names LlamaTokenizer)
    config = AutoConfig.for_model(**{k: v for k, v in record.config.items() if k != "quantization_config"})
    mine = AutoTokenizer.from_pretrained(str(record.tokenizer_dir), config=config)(text)["input_ids"]
    theirs = AutoTokenizer.from_pretrained(str(path))(text)["input_ids"]
    ids = torch.tensor([mine[:max_tokens]], dtype=torch.long)
    return ids, {"tokens_match": list(mine) == list(theirs), "text": str(src), "n_text_tokens": len(mine)}
