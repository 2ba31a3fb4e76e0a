"""Engine checks of an ONNX export: onnxruntime logits, the KV-cache path, onnxruntime-genai greedy text.

Each function runs one real engine on the exported directory and compares it with `simulate()`
(the reference) or with itself; tolerances live with the caller (`formats.onnx.verify`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEFAULT_PROMPTS",
    "OrtDecoder",
    "simulate_logits",
    "kv_cache_check",
    "genai_greedy",
    "simulate_greedy",
    "tokenization_parity",
    "engine_versions",
]

log = logging.getLogger(__name__)

#: fixed prompts for the greedy-text check (plain text: no chat template, so every tokenizer works)
DEFAULT_PROMPTS = (
    "Once upon a time, there was a little girl named",
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
)


class OrtDecoder:
    """An onnxruntime session over `model.onnx` with explicit KV-cache tensors (batch 1)."""

    def __init__(self, model_dir: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), so, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in self.session.get_inputs()}
        self.past_names = sorted((n for n in ins if n.startswith("past_key_values.")),
                                 key=lambda n: (int(n.split(".")[1]), n.endswith("value")))
        first = ins[self.past_names[0]]
        self.kv_heads, self.head_dim = _dim(first.shape[1], model_dir, "num_key_value_heads"), \
            _dim(first.shape[3], model_dir, "head_size")
        self.kv_dtype = np.float16 if "float16" in first.type else np.float32

    def empty_cache(self) -> dict[str, np.ndarray]:
        return {n: np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype) for n in self.past_names}

    def step(self, ids: np.ndarray, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits `[len(ids), vocab]` for new tokens `ids` after the cached ones, and the new cache."""
        past = next(iter(cache.values())).shape[2]
        feed = {"input_ids": np.asarray(ids, np.int64)[None],
                "attention_mask": np.ones((1, past + len(ids)), np.int64), **cache}
        outs = self.session.run(None, feed)
        names = [o.name for o in self.session.get_outputs()]
        new = {n.replace("present.", "past_key_values."): v for n, v in zip(names, outs) if n.startswith("present.")}
        return outs[names.index("logits")][0].astype(np.float32), new

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.step(ids, self.empty_cache())[0]


def _dim(value: Any, model_dir: Path, key: str) -> int:
    """A KV-cache dimension: from the graph when static, else from genai_config.json (symbolic dims,
    as in onnxruntime-genai builder models)."""
    if isinstance(value, int):
        return value
    cfg = json.loads((Path(model_dir) / "genai_config.json").read_text())
    return int(cfg["model"]["decoder"][key])


def simulate_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids, np.int64))[None]).logits[0].float().numpy()


def kv_cache_check(dec: OrtDecoder, ids: np.ndarray, decode_steps: int) -> dict[str, Any]:
    """Prefill `len(ids) − decode_steps` tokens, decode the rest one token at a time with the KV
    cache, and compare with one pass over all tokens."""
    n = len(ids) - decode_steps
    full = dec.logits(ids)
    lg, cache = dec.step(ids[:n], dec.empty_cache())
    parts = [lg]
    for t in range(n, len(ids)):
        lg, cache = dec.step(ids[t:t + 1], cache)
        parts.append(lg)
    inc = np.concatenate(parts)
    rel = float(np.linalg.norm(inc - full) / max(np.linalg.norm(full), 1e-30))
    return {"prefill_tokens": n, "decode_steps": decode_steps, "kv_rel_l2": rel,
            "kv_max_abs_diff": float(np.abs(inc - full).max()),
            "kv_top1_agreement": float((inc.argmax(-1) == full.argmax(-1)).mean())}


def genai_greedy(model_dir: Path, prompts_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations (new token ids only) from onnxruntime-genai, prompts given as ids."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    outs = []
    for ids in prompts_ids:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False, top_k=1)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray([ids], np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        outs.append([int(t) for t in gen.get_sequence(0)][len(ids):])
        del gen
    return outs


def simulate_greedy(model: torch.nn.Module, prompts_ids: list[list[int]], new_tokens: int,
                    eos: int | list[int] | None) -> list[list[int]]:
    """Greedy continuations from the reference, stopping at `eos` like onnxruntime-genai."""
    stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    outs = []
    for ids in prompts_ids:
        x = torch.tensor([ids])
        new: list[int] = []
        with torch.no_grad():
            out = model(x, use_cache=True)
            for _ in range(new_tokens):
                t = int(out.logits[0, -1].argmax())
                new.append(t)
                if t in stop:
                    break
                out = model(torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
        outs.append(new)
    return outs


def tokenization_parity(model_dir: Path, hf_tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """onnxruntime-genai's tokenizer against the HF tokenizer (without special tokens, since genai's
    encode adds none), and decode of the HF ids."""
    import onnxruntime_genai as og

    tok = og.Tokenizer(og.Model(str(model_dir)))
    enc_ok, dec_ok, first_bad = 0, 0, None
    for text in texts:
        ref = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        got = [int(t) for t in tok.encode(text)]
        if got == ref:
            enc_ok += 1
        elif first_bad is None:
            first_bad = {"text": text[:80], "hf": ref[:12], "genai": got[:12]}
        if tok.decode(np.asarray(ref, np.int32)) == hf_tokenizer.decode(ref, skip_special_tokens=True):
            dec_ok += 1
    bos = getattr(hf_tokenizer, "bos_token_id", None)
    probe = hf_tokenizer("a")["input_ids"]
    return {"texts": len(texts), "encode_match": enc_ok, "decode_match": dec_ok,
            "tokenization_match": enc_ok == len(texts) and dec_ok == len(texts),
            "hf_adds_bos": bool(bos is not None and probe and probe[0] == bos), "first_mismatch": first_bad}


def engine_versions() -> str:
    import onnxruntime as ort
    import onnxruntime_genai as og

    return f"onnxruntime {ort.__version__} (CPUExecutionProvider) + onnxruntime-genai {og.__version__}"
