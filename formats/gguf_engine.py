"""llama.cpp (through llama-cpp-python) against `simulate()`: logits, tokenization and greedy text.

Logit comparisons on the same token ids, all measured in one run:

- `control_f32`: the run's exact weights written as an all-F32 GGUF, run by llama.cpp, vs `simulate()`.
  Only float summation order differs (expect rel. L2 ~1e-6): it proves names, permutation, RoPE,
  norms and metadata right, independently of the storage types.
- `activation_rounding`: `simulate()` with llama.cpp's 8-bit activation rounding applied
  (`gguf_arith`) vs plain `simulate()`: the size of the deviation llama.cpp's own arithmetic causes
  on *this* model. (Rounding is discontinuous, so after a few layers the engine's and our rounding
  decisions decorrelate: it predicts the size, not the values, of the engine's deviation.)
- the headline numbers (`top1_agreement`, `kl_mean`, ...): the quantized file in llama.cpp vs plain
  `simulate()`. They must stay within a small multiple of `activation_rounding` (`TOLERANCE`): a
  wrong byte layout, permutation or norm gives errors 10× larger.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lfq_export.compare import compare_logits, first_divergence
from lfq_export.errors import FormatError
from lfq_export.record import QuantizedModel
from lfq_export.simulate import simulate

from .gguf_arith import llamacpp_activations
from .gguf_tensors import adapter_of, gguf_names
from .gguf_vocab import load_hf_tokenizer

log = logging.getLogger(__name__)

__all__ = ["engine_checks", "TOLERANCE", "PROMPTS", "parity_texts", "llama_cpp_engine_name", "open_llama",
           "engine_logits", "engine_greedy", "simulate_greedy", "default_text_path"]

#: pass criteria: the control within float summation noise; the quantized file within
#: `quantized_factor` × the activation-rounding deviation measured on the same tokens (plus the control).
TOLERANCE = {
    "control_rel_l2": 1e-3,
    "control_top1": 0.99,
    "quantized_factor": 2.0,
}

PROMPTS = ("Once upon a time", "The capital of France is", "One day, a little girl named Lily",
           "def fibonacci(n):")


def llama_cpp_engine_name() -> str:
    import llama_cpp

    return f"llama.cpp via llama-cpp-python {llama_cpp.__version__}"


def default_text_path() -> Path | None:
    """WikiText-2 raw test from the shared assets (`LFQ_SHARED_ASSETS`, or a `shared/assets` beside the repo)."""
    env = os.environ.get("LFQ_SHARED_ASSETS")
    roots = [Path(env)] if env else []
    here = Path(__file__).resolve()
    roots += [p / "shared" / "assets" for p in here.parents] + [p.parent / "shared" / "assets" for p in here.parents]
    for r in roots:
        f = r / "text" / "wikitext2_raw_test.txt"
        if f.is_file():
            return f
    return None


def _text(options: dict[str, Any]) -> str:
    path = options.get("text") or default_text_path()
    if path is None:
        raise FormatError("no text for the engine comparison: pass --text FILE (WikiText-2 was not found)")
    return Path(path).read_text(encoding="utf-8")


@contextmanager
def open_llama(path: Path, n_ctx: int, n_threads: int | None = None) -> Iterator[Any]:
    """A llama.cpp context with logits for every position and an F32 KV cache (no extra rounding)."""
    try:
        import llama_cpp
    except ImportError:
        raise FormatError("llama-cpp-python is not installed (pip install 'lfq-export[engines]'); "
                          "or verify weights only with --no-engine") from None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          type_k=0, type_v=0, n_threads=n_threads or min(4, os.cpu_count() or 1), seed=0, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def engine_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def engine_greedy(llm: Any, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


@torch.no_grad()
def simulate_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation and, per step, the top-1 minus top-2 logit margin."""
    out, margins, past = [], [], None
    x = torch.tensor([prompt])
    for _ in range(n):
        res = model(input_ids=x, past_key_values=past, use_cache=True)
        past = res.past_key_values
        top = torch.topk(res.logits[0, -1].float(), 2)
        out.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        x = torch.tensor([[out[-1]]])
    return out, margins


def parity_texts(tok: Any, text: str) -> list[str]:
    """Texts for tokenization parity: prose, whitespace, digits, unicode, and special-token strings."""
    texts = [text[:3000],
             "Hello world! It's 3.14 - naïve café, Ünïcödé, 日本語のテキスト, Привет, emoji 🚀🦙😶‍🌫️.",
             "  leading spaces,\ttabs\n\nand newlines\r\n   trailing  ",
             "Numbers: 1 12 123 1234 12345 1,000,000 0x1F 2024-11-22 v1.2.3 I'M DON'T we'Ve",
             "def f(x):\n    return {'a': [1, 2]}  # comment\n"]
    specials = [t for t in (tok.bos_token, tok.eos_token) if isinstance(t, str)]
    if specials:
        texts.append(f"{specials[0]}A story.{specials[-1]}{specials[0]}Another one.")
    if getattr(tok, "chat_template", None):
        try:
            texts.append(tok.apply_chat_template([{"role": "user", "content": "Write a haiku about autumn."}],
                                                 tokenize=False, add_generation_prompt=True))
        except Exception as e:  # noqa: BLE001 - a template that fails to render is reported, not fatal
            log.warning("chat template does not render (%s); skipped in tokenization parity", e)
    return texts


def _spm_rule_ids(tok: Any, text: str, add_bos: bool) -> list[int]:
    """What llama.cpp's SentencePiece tokenizer produces: it prefixes a space to *every* raw-text
    fragment (the first one and each one after a special token), where HF's Metaspace prefixes only
    a text that does not already start with one, and only the first fragment."""
    added = sorted((t.content for t in tok.added_tokens_decoder.values()), key=len, reverse=True)
    ids = [tok.bos_token_id] if add_bos and tok.bos_token_id is not None else []
    parts = re.split("(" + "|".join(map(re.escape, added)) + ")", text) if added else [text]
    for part in parts:
        if not part:
            continue
        if part in added:
            ids.append(tok.convert_tokens_to_ids(part))
        else:
            ids += tok.encode(" " + part, add_special_tokens=False)
    return ids


def _tokenization(llm: Any, tok: Any, texts: list[str], spm: bool) -> list[dict[str, Any]]:
    rows = []
    add_bos = tok.bos_token_id is not None and tok.encode("a")[:1] == [tok.bos_token_id]
    for t in texts:
        hf = tok.encode(t)
        eng = llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)
        row = {"text": t[:60], "match": hf == eng, "n_hf": len(hf), "n_engine": len(eng),
               "first_diff": None if hf == eng else first_divergence(hf, eng)}
        if hf != eng and spm and eng == _spm_rule_ids(tok, t, add_bos):
            row["cause"] = ("llama.cpp's SentencePiece tokenizer prefixes a space to every text fragment "
                            "(leading whitespace, text after a special token); no GGUF key changes that")
        rows.append(row)
    return rows


def _file_types(path: Path, record: QuantizedModel) -> dict[str, gguf.GGMLQuantizationType]:
    """HF module name → ggml type of its weight in the file (the tied head uses token_embd's type)."""
    adapter = adapter_of(record)
    to_hf = {g: h for h, g in gguf_names(record, adapter).items()}
    types = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        hf = to_hf.get(t.name, "")
        if hf.endswith(".weight"):
            types[hf[: -len(".weight")]] = gguf.GGMLQuantizationType(int(t.tensor_type))
    if adapter.lm_head not in types and adapter.embedding in types:
        types[adapter.lm_head] = types[adapter.embedding]
    return types


def _pre_of(path: Path) -> str | None:
    f = gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.pre")
    return None if f is None else str(f.contents())


def _control_logits(record: QuantizedModel, path: Path, ids: list[int], n_ctx: int) -> np.ndarray:
    from .gguf_write import write_gguf

    with tempfile.TemporaryDirectory(prefix="lfq-gguf-control-") as tmp:
        control = write_gguf(record, Path(tmp) / "control-f32.gguf", {"gguf_tokenizer_pre": _pre_of(path)},
                             dequantize_all=True)
        with open_llama(control, n_ctx) as llm:
            return engine_logits(llm, ids)


@torch.no_grad()
def engine_checks(path: Path, record: QuantizedModel, options: dict[str, Any],
                  model: torch.nn.Module | None = None) -> dict[str, Any]:
    """All engine-side measurements of `verify` (see the module docstring); `model` = `simulate(record)`."""
    tok = load_hf_tokenizer(record.tokenizer_dir)
    text = _text(options)
    ids = tok.encode(text)[: int(options.get("max_tokens") or 256)]
    n_gen = int(options.get("gen_tokens") or 24)
    prompts = list(options.get("prompts") or PROMPTS)
    prompt_ids = [tok.encode(p) for p in prompts]
    n_ctx = max(len(ids), max(len(p) for p in prompt_ids) + n_gen) + 8
    model = model if model is not None else simulate(record)
    sim = model(torch.tensor([ids])).logits[0].float().numpy()
    with llamacpp_activations(model, _file_types(path, record)):
        rounded = model(torch.tensor([ids])).logits[0].float().numpy()
    spm = _tokenizer_model(path) == "llama"
    with open_llama(path, n_ctx) as llm:
        quant = engine_logits(llm, ids)
        tokenization = _tokenization(llm, tok, parity_texts(tok, text), spm)
        eng_gen = [engine_greedy(llm, p, n_gen) for p in prompt_ids]
        detok = [llm.detokenize(p + g).decode("utf-8", errors="replace") for p, g in zip(prompt_ids, eng_gen)]
    control = compare_logits(sim, _control_logits(record, path, ids, n_ctx))
    act = compare_logits(sim, rounded)
    q = compare_logits(sim, quant)
    greedy = _greedy(model, tok, prompts, prompt_ids, eng_gen, detok, n_gen, _margin_noise(sim, quant))
    f = TOLERANCE["quantized_factor"]
    bound = {"rel_l2": f * act["rel_l2"] + control["rel_l2"], "kl_mean": f * f * act["kl_mean"] + control["kl_mean"]}
    checks = {
        "control_ok": control["rel_l2"] <= TOLERANCE["control_rel_l2"] and control["top1_agreement"] >= TOLERANCE["control_top1"],
        "quantized_ok": q["rel_l2"] <= bound["rel_l2"] and q["kl_mean"] <= bound["kl_mean"],
    }
    return {
        "engine": llama_cpp_engine_name(),
        **{k: q[k] for k in ("tokens", "top1_agreement", "kl_mean", "kl_max", "max_abs_diff", "rel_l2")},
        "control_f32": control,
        "activation_rounding": act,
        "tolerance": {**TOLERANCE, "quantized_rel_l2_bound": bound["rel_l2"], "quantized_kl_mean_bound": bound["kl_mean"]},
        **checks,
        "engine_ok": all(checks.values()),
        "tokens_match": all(r["match"] for r in tokenization),
        "tokens_match_except_known": all(r["match"] or "cause" in r for r in tokenization),
        "tokenization": tokenization,
        "greedy_match": all(g["match"] for g in greedy),
        "greedy": greedy,
    }


def _margin_noise(ref: np.ndarray, test: np.ndarray, q: float = 0.99) -> float:
    """How much the engine moves simulate's top-1 − top-2 logit margin, per token (the `q` quantile):
    a greedy divergence at a step whose margin is smaller is a near-tie that arithmetic can flip."""
    top2 = np.argsort(ref, axis=-1)[:, -2:]
    rows = np.arange(ref.shape[0])
    m_ref = ref[rows, top2[:, 1]] - ref[rows, top2[:, 0]]
    m_test = test[rows, top2[:, 1]] - test[rows, top2[:, 0]]
    return float(np.quantile(np.abs(m_ref - m_test), q))


def _tokenizer_model(path: Path) -> str | None:
    f = gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.model")
    return None if f is None else str(f.contents())


def _greedy(model: torch.nn.Module, tok: Any, prompts: list[str], prompt_ids: list[list[int]], eng_gen: list[list[int]],
            detok: list[str], n: int, margin_noise: float) -> list[dict[str, Any]]:
    """Per prompt: both continuations, the first divergence and whether a near-tie explains it.

    Both continuations are shown decoded by the HF tokenizer; `detokenize_match` compares llama.cpp's
    own detokenization of prompt + continuation with HF's (special tokens skipped)."""
    rows = []
    for prompt, pid, eng, eng_text in zip(prompts, prompt_ids, eng_gen, detok):
        sim, margins = simulate_greedy(model, pid, n)
        k = first_divergence(sim, eng)
        row = {"prompt": prompt, "match": sim == eng, "first_divergence": None if sim == eng else k,
               "simulate_text": tok.decode(sim), "engine_text": tok.decode(eng),
               "detokenize_match": tok.decode(pid + eng, skip_special_tokens=True) == eng_text}
        if sim != eng:
            row["simulate_margin"] = margins[k]
            row["margin_noise_p99"] = margin_noise
            row["explained_by_arithmetic"] = margins[k] <= margin_noise
        rows.append(row)
    return rows
