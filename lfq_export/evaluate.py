"""Quality of a quantized model against its FP model.

On held-out text (non-overlapping windows): perplexity of both models, mean KL(FP‖Q) per token,
top-1 agreement. On FP-greedy generations from a prompt file: KL and top-1 agreement by position
(teacher-forced on the FP text) and the length of the greedy prefix the quantized model reproduces
(the first position where Q's argmax differs from FP's token: exactly where Q's own greedy text
would diverge). This is the measurement behind the paper's claim: generation quality, not only
perplexity.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_file
from .errors import InputError

__all__ = ["EvalOptions", "FPReference", "evaluate_run", "evaluate_model", "read_prompts", "plot_kl_by_position"]


@dataclass(frozen=True)
class EvalOptions:
    """Settings of `lfq-export eval`."""

    fp_model: str | None = None
    text: Path | None = None
    max_tokens: int = 16384
    seqlen: int = 512
    prompts: Path | None = None
    gen_tokens: int = 256
    max_prompts: int | None = None
    chat: bool = False
    progress: bool = True


def read_prompts(path: Path, limit: int | None = None) -> list[str]:
    """Prompts: one per line, or JSONL with a `prompt` (or `question`) field."""
    if not Path(path).is_file():
        raise InputError(f"prompt file {path} does not exist")
    prompts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if str(path).endswith(".jsonl"):
            obj = json.loads(line)
            prompts.append(str(obj.get("prompt", obj.get("question", ""))))
        else:
            prompts.append(line.rstrip())
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts")
    return prompts[:limit] if limit else prompts


def _text_windows(tokenizer: Any, text_path: Path, max_tokens: int, seqlen: int) -> list[torch.Tensor]:
    if not Path(text_path).is_file():
        raise InputError(f"evaluation text {text_path} does not exist")
    text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text[: max_tokens * 16], add_special_tokens=True)["input_ids"][:max_tokens]
    if len(ids) < seqlen:
        seqlen = len(ids)
    if seqlen < 2:
        raise InputError(f"evaluation text {text_path} is too short")
    return [torch.tensor(ids[i : i + seqlen]) for i in range(0, len(ids) - seqlen + 1, seqlen)]


@dataclass
class FPReference:
    """What evaluation needs from the FP model, computed once and reused for many quantized models:
    the text windows with the FP NLL, and the FP greedy generations."""

    model: Any
    tokenizer: Any
    options: EvalOptions
    windows: list[torch.Tensor] = field(default_factory=list)
    fp_nll: float = 0.0
    fp_tokens: int = 0
    generations: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (ids, prompt length)

    @classmethod
    @torch.no_grad()
    def build(cls, model: Any, tokenizer: Any, options: EvalOptions) -> FPReference:
        ref = cls(model.eval(), tokenizer, options)
        if options.text is not None:
            ref.windows = _text_windows(tokenizer, options.text, options.max_tokens, options.seqlen)
        if options.prompts is not None:
            prompts = read_prompts(options.prompts, options.max_prompts)
            for p in tqdm(prompts, desc="FP greedy generations", disable=not options.progress, leave=False):
                ids = _prompt_ids(tokenizer, p, options.chat)
                out = model.generate(ids, max_new_tokens=options.gen_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
                ref.generations.append((out[0], ids.shape[1]))
        return ref


def _prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return ids
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.double(), dim=-1)


@torch.no_grad()
def evaluate_model(ref: FPReference, qmodel: Any) -> dict[str, Any]:
    """All metrics of one quantized model against the FP reference."""
    res: dict[str, Any] = {}
    opts = ref.options
    if ref.windows:
        nll_fp = nll_q = kl = agree = 0.0
        n_pred = n_all = 0
        for w in tqdm(ref.windows, desc="text windows", disable=not opts.progress, leave=False):
            lf = _log_softmax(ref.model(w[None]).logits[0])
            lq = _log_softmax(qmodel(w[None]).logits[0])
            tgt = w[1:]
            nll_fp -= float(lf[:-1].gather(-1, tgt[:, None]).sum())
            nll_q -= float(lq[:-1].gather(-1, tgt[:, None]).sum())
            kl += float((lf.exp() * (lf - lq)).sum())
            agree += float((lf.argmax(-1) == lq.argmax(-1)).sum())
            n_pred += len(tgt)
            n_all += len(w)
        res.update({
            "ppl_fp": math.exp(nll_fp / n_pred),
            "ppl": math.exp(nll_q / n_pred),
            "kl_mean": kl / n_all,
            "top1_agreement": agree / n_all,
            "eval_tokens": n_all,
        })
    if ref.generations:
        res.update(_generation_metrics(ref, qmodel))
    return res


def _generation_metrics(ref: FPReference, qmodel: Any) -> dict[str, Any]:
    kl_sum: list[float] = []
    kl_cnt: list[int] = []
    prefixes, agree, total = [], 0.0, 0
    for ids, plen in tqdm(ref.generations, desc="generation metrics", disable=not ref.options.progress, leave=False):
        n_gen = ids.shape[0] - plen
        if n_gen <= 0:
            continue
        # logits at positions plen-1 .. end-1 predict the generated tokens
        lf = _log_softmax(ref.model(ids[None]).logits[0, plen - 1 : -1])
        lq = _log_softmax(qmodel(ids[None]).logits[0, plen - 1 : -1])
        kl = (lf.exp() * (lf - lq)).sum(-1)
        gen = ids[plen:]
        match = (lq.argmax(-1) == gen)
        mism = (~match).nonzero()
        prefixes.append(int(mism[0]) if len(mism) else n_gen)
        agree += float(match.sum())
        total += n_gen
        for i, v in enumerate(kl.tolist()):
            if i == len(kl_sum):
                kl_sum.append(0.0)
                kl_cnt.append(0)
            kl_sum[i] += v
            kl_cnt[i] += 1
    if not prefixes:
        return {}
    kl_by_pos = [s / c for s, c in zip(kl_sum, kl_cnt)]
    return {
        "gen_prompts": len(prefixes),
        "gen_tokens": total,
        "gen_kl_mean": float(sum(kl_sum) / max(sum(kl_cnt), 1)),
        "gen_top1_agreement": agree / max(total, 1),
        "gen_prefix_match_mean": float(np.mean(prefixes)),
        "gen_prefix_match": prefixes,
        "kl_by_position": kl_by_pos,
        "kl_by_position_count": kl_cnt,
    }


def plot_kl_by_position(curves: dict[str, list[float]], path: Path, title: str = "KL(FP‖Q) by generation position",
                        smooth: int = 8) -> None:
    """One line per label; a moving average of `smooth` positions keeps noisy curves readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, ys in curves.items():
        y = np.asarray(ys, dtype=float)
        if smooth > 1 and len(y) > smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
        ax.plot(np.arange(len(y)), y, label=label)
    ax.set_xlabel("generated token position")
    ax.set_ylabel(f"mean KL (nats){f', {smooth}-token moving average' if smooth > 1 else ''}")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(Path(path), overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def evaluate_run(run: Path, options: EvalOptions, json_out: Path | None = None, plot: Path | None = None) -> dict[str, Any]:
    """`lfq-export eval`: load the run, its FP model and tokenizer, compute, write JSON and plot."""
    from transformers import AutoTokenizer

    from .model_io import resolve_model
    from .record import QuantizedModel
    from .simulate import simulate

    if options.text is None and options.prompts is None:
        raise InputError("nothing to evaluate: pass --text and/or --prompts")
    record = QuantizedModel.load(run)
    fp_spec = options.fp_model or record.report.get("model")
    if not fp_spec:
        raise InputError(f"{run}: the run does not name its FP model; pass --fp MODEL")
    source = resolve_model(fp_spec, allow_pickle=bool(record.report.get("settings", {}).get("allow_pickle")))
    # the FP model's directory: its config.json makes transformers pick the same tokenizer class
    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    ref = FPReference.build(source.load_model(), tokenizer, options)
    result = {"run": str(run), "scheme": record.scheme,
              "method": record.report.get("settings", {}).get("method"),
              "final_loss": record.report.get("settings", {}).get("final_loss")}
    result.update(evaluate_model(ref, simulate(record)))
    if json_out is not None:
        with atomic_file(Path(json_out), overwrite=True) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
        if plot is None and "kl_by_position" in result:
            plot = Path(json_out).with_suffix(".png")
    if plot is not None and "kl_by_position" in result:
        plot_kl_by_position({f"{record.scheme} {result['method']}": result["kl_by_position"]}, plot)
    return result
