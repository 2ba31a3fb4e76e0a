"""The LFQ final-block objective: token-mean soft cross-entropy through the frozen final norm and head.

    L = −(1/T) Σ_t Σ_v p_FP(v | t) · log p_Q(v | t)

p_FP = softmax(head(norm(h_FP))) with h_FP the FP final block's output on the FP trajectory (the
teacher), p_Q = softmax(head(norm(h_Q))) with h_Q the quantized final block's output on the quantized
trajectory (the student). The teacher is fixed, so L = KL(p_FP ‖ p_Q) + H(p_FP): same gradients as KL.
Padding positions (mask 0) are excluded from the mean.

Full-vocabulary logits are large (2048 tokens × 152k vocab × 4 B ≈ 1.25 GB), so the loss is computed
in token chunks: the student hidden state is detached, each chunk's loss is back-propagated into it,
and the accumulated gradient is then sent through the block once. Peak memory is one chunk's logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ce_kernel import ce_kernel_available, column_terms, softmax_gap

__all__ = ["LogitHead", "soft_ce", "chunked_soft_ce_backward", "teacher_log_probs", "TeacherCache", "CEStats"]


class LogitHead(nn.Module):
    """Frozen final norm + LM head (weights never receive gradients)."""

    def __init__(self, norm: nn.Module, head_weight: torch.Tensor, head_bias: torch.Tensor | None = None):
        super().__init__()
        self.norm = norm
        for p in self.norm.parameters():
            p.requires_grad_(False)
        self.register_buffer("weight", head_weight.detach().to(torch.float32), persistent=False)
        self.register_buffer("bias", None if head_bias is None else head_bias.detach().float(), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.logits(h)

    def logits(self, h: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """fp32 logits with the matmul's inputs in `dtype` (bf16: 4-5x faster here, fp32 accumulation)."""
        return self.logits_of_normed(self.norm(h), dtype)

    def logits_of_normed(self, hn: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        z = F.linear(hn.to(dtype), self.weight_as(dtype)).float()
        return z if self.bias is None else z.add_(self.bias)

    def vocab_major_logits(self, hn: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """fp32 logits of normed rows `hn` `[T, hidden]`, transposed: `[vocab, T]`, computed as
        `W @ hn.T`. For a few dozen rows that product runs ~1.5× faster than `hn @ W.T` on a 2-core
        AVX2 CPU (MKL; 51 against 77 ms for 64 rows of SmolLM2's head), and so does its gradient
        `W.T @ g` (40 against 57 ms)."""
        z = (self.weight_as(dtype) @ hn.to(dtype).t()).float()
        return z if self.bias is None else z.add_(self.bias[:, None])

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The head weight in `dtype`, cast once and kept (bf16 matmuls are 2–3× faster on this CPU)."""
        if dtype == torch.float32:
            return self.weight
        cache = self.__dict__.setdefault("_casts", {})
        if dtype not in cache:
            cache[dtype] = self.weight.to(dtype)
        return cache[dtype]


@torch.no_grad()
def teacher_log_probs(head: LogitHead, h_fp: torch.Tensor, chunk_tokens: int = 1024,
                      dtype: torch.dtype = torch.float16, logit_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log p_FP for every token of `h_fp` (`[..., hidden]` → `[..., vocab]` in `dtype`; the logit matmul
    in `logit_dtype`, as in `chunked_soft_ce_backward`).

    Cached once per calibration sample when it fits in memory, so each optimisation step needs one
    logit matmul fewer. fp16 keeps log-probabilities of likely tokens (|log p| < 2) to 1e-3."""
    flat = h_fp.reshape(-1, h_fp.shape[-1])
    out = torch.empty(flat.shape[0], head.weight.shape[0], dtype=dtype)
    for a in range(0, flat.shape[0], chunk_tokens):
        out[a : a + chunk_tokens] = torch.log_softmax(head.logits(flat[a : a + chunk_tokens], logit_dtype), dim=-1).to(dtype)
    return out.reshape(*h_fp.shape[:-1], -1)


class TeacherCache:
    """fp16 log p_FP of calibration samples, computed on first use and kept (when it fits in memory).

    A sample's teacher distribution is needed every time the sample is drawn; caching it saves one
    full-vocabulary matmul per later visit. Lazy filling costs nothing for samples never drawn."""

    def __init__(self, head: LogitHead, hidden: Callable[[list[int]], torch.Tensor], n: int, seqlen: int,
                 chunk_tokens: int, max_bytes: float, logit_dtype: torch.dtype = torch.float32):
        self.head, self.hidden, self.chunk, self.logit_dtype = head, hidden, chunk_tokens, logit_dtype
        vocab = head.weight.shape[0]
        self.enabled = n * seqlen * vocab * 2 <= max_bytes
        self.data = torch.empty(n, seqlen, vocab, dtype=torch.float16) if self.enabled else None
        self.filled = torch.zeros(n, dtype=torch.bool)

    def get(self, idx: list[int]) -> torch.Tensor | None:
        """`[len(idx), seqlen, vocab]` log-probabilities, or None when caching is off (recompute)."""
        if not self.enabled:
            return None
        todo = [i for i in idx if not self.filled[i]]
        if todo:
            self.data[todo] = teacher_log_probs(self.head, self.hidden(todo), self.chunk,
                                                   logit_dtype=self.logit_dtype).cpu()
            self.filled[todo] = True
        return self.data[idx]


@dataclass
class CEStats:
    """Sums over valid tokens; divide by `tokens` for means."""

    ce: float = 0.0
    kl: float = 0.0
    top1_agree: float = 0.0
    tokens: float = 0.0

    def add(self, other: CEStats) -> None:
        self.ce += other.ce
        self.kl += other.kl
        self.top1_agree += other.top1_agree
        self.tokens += other.tokens

    def means(self) -> dict[str, float]:
        n = max(self.tokens, 1.0)
        return {"ce": self.ce / n, "kl": self.kl / n, "top1_agreement": self.top1_agree / n}


@dataclass
class _VocabTerms:
    """Per-token terms of one `[V, T]` chunk: CE, KL and top-1 agreement (None unless asked), and the
    `[V, T]` gradient of the weighted CE with respect to the student logits (None unless asked)."""

    ce: torch.Tensor
    kl: torch.Tensor | None
    agree: torch.Tensor | None
    grad: torch.Tensor | None


def _vocab_terms(z: torch.Tensor, u: torch.Tensor, stats: bool, grad_scale: torch.Tensor | None,
                 grad_dtype: torch.dtype) -> _VocabTerms:
    """Soft CE of student logits `z` against the teacher softmax(`u`), both `[V, T]` (u: logits or
    log-probabilities). CE = lse(z) − Σ p·z since Σ p = 1; KL = CE + Σ p·log p; the gradient is
    (softmax(z) − p) · `grad_scale`. The fused kernel (`ce_kernel`) does it in three passes; the eager
    path is its reference and the fallback."""
    if ce_kernel_available(z, u) and grad_dtype in (torch.float32, torch.bfloat16):
        lse, lse_u, pz, pu, az, au = column_terms(z, u, argmax=stats)
        ce = lse - pz
        grad = None if grad_scale is None else softmax_gap(z, u, lse, lse_u, grad_scale, grad_dtype)
        return _VocabTerms(ce, ce + (pu - lse_u) if stats else None, (az == au).float() if stats else None, grad)
    logp = u - torch.logsumexp(u, dim=0)
    p = logp.exp()
    lse = torch.logsumexp(z, dim=0)
    ce = lse - (p * z).sum(0)
    kl = agree = grad = None
    if stats:
        kl = ce + (p * logp).sum(0)
        agree = (u.argmax(0) == z.argmax(0)).float()
    if grad_scale is not None:
        grad = (z - lse).exp_().sub_(p).mul_(grad_scale)
    return _VocabTerms(ce, kl, agree, grad)


def _chunk_terms(head: LogitHead, h_q: torch.Tensor, h_fp: torch.Tensor, m: torch.Tensor):
    """Per-token CE, teacher entropy and top-1 agreement for one chunk of flattened tokens."""
    logq = torch.log_softmax(head(h_q), dim=-1)
    with torch.no_grad():
        logp = torch.log_softmax(head(h_fp), dim=-1)
        p = logp.exp()
        ent = -(p * logp).sum(-1)
        agree = (logp.argmax(-1) == logq.argmax(-1)).float()
    ce = -(p * logq).sum(-1)
    return ce * m, ent * m, agree * m


def soft_ce(head: LogitHead, h_q: torch.Tensor, h_fp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Unchunked token-mean soft CE (reference implementation; differentiable in `h_q`)."""
    hq = h_q.reshape(-1, h_q.shape[-1])
    hf = h_fp.reshape(-1, h_fp.shape[-1]).to(hq.dtype)
    m = torch.ones(hq.shape[0], device=hq.device) if mask is None else mask.reshape(-1).float()
    ce, _, _ = _chunk_terms(head, hq, hf, m)
    return ce.sum() / m.sum().clamp(min=1)


def chunked_soft_ce_backward(
    head: LogitHead,
    h_q: torch.Tensor,
    h_fp: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    backward: bool = True,
    stats: bool = True,
    teacher_logp: torch.Tensor | None = None,
    grad_dtype: torch.dtype = torch.float32,
    logit_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, CEStats]:
    """Token-mean soft CE computed chunk by chunk; if `backward`, gradients flow into `h_q`'s graph.

    The gradient of the soft CE w.r.t. the student logits is `softmax(z_Q) − p_FP` (per token, divided
    by the number of valid tokens), so it is formed directly — no autograd graph over `[tokens, vocab]`
    tensors — and sent through the head with one matmul; autograd takes over at the (cheap) final norm.
    This keeps the per-chunk work to one logit matmul (student and teacher rows together), one gradient
    matmul and three passes over the vocab-major `[V, T]` logits (`ce_kernel`; eagerly about ten).
    `grad_dtype=torch.bfloat16` runs the gradient matmul in bf16 (2–3× faster on AVX-512-BF16 CPUs; its
    rounding is far below the optimiser's own noise; the engine uses it with bf16 compute).
    `logit_dtype=torch.bfloat16` does the same for the student's and the teacher's logits (with bf16
    compute: bf16 matmul inputs, fp32 accumulation, softmax in fp32). `teacher_logp` (`[..., vocab]`,
    any float dtype) replaces the teacher forward when the teacher's log-probabilities were cached.
    Returns the loss value (detached) and summed statistics (`stats=False` skips the diagnostics)."""
    shape = h_q.shape
    flat_q = h_q.reshape(-1, shape[-1])
    flat_fp = h_fp.reshape(-1, shape[-1]).to(flat_q.dtype)
    flat_tl = None if teacher_logp is None else teacher_logp.reshape(-1, teacher_logp.shape[-1])
    w_g = head.weight_as(grad_dtype) if backward else None
    m = torch.ones(flat_q.shape[0], device=flat_q.device) if mask is None else mask.reshape(-1).float()
    n_valid = m.sum().clamp(min=1)
    leaf = flat_q.detach().requires_grad_(backward)
    out = CEStats(tokens=float(m.sum()))
    total = 0.0
    if flat_tl is None:  # teacher and student rows share one logit matmul (one pass over the head, whose
        chunk_tokens = max(1, chunk_tokens // 2)  # weights dominate at ~64 rows): half the chunk, same memory
    for a in range(0, flat_q.shape[0], chunk_tokens):
        b = min(a + chunk_tokens, flat_q.shape[0])
        mc = m[a:b]
        with torch.set_grad_enabled(backward):
            hn = head.norm(leaf[a:b])
        with torch.no_grad():  # vocab-major: logits are [V, T] (`vocab_major_logits`)
            if flat_tl is not None:  # student logits; the cached teacher log-probs serve as its logits
                z = head.vocab_major_logits(hn.detach(), logit_dtype)  # (their softmax renormalises them)
                u = flat_tl[a:b].float().t().contiguous()
            else:  # student and teacher logits, in one matmul in the same dtype
                both = head.vocab_major_logits(torch.cat([hn.detach(), head.norm(flat_fp[a:b])]), logit_dtype)
                z, u = both[:, : b - a], both[:, b - a :]
            terms = _vocab_terms(z, u, stats, (mc / n_valid) if backward else None, grad_dtype)
            ce = terms.ce * mc
            total += float(ce.sum() / n_valid)
            if stats:
                out.ce += float(ce.sum())
                out.kl += float((terms.kl * mc).sum())
                out.top1_agree += float((terms.agree * mc).sum())
            if backward:
                g_hn = (w_g.t() @ terms.grad.to(grad_dtype)).t().float()
        if backward:
            hn.backward(g_hn)
    if backward:
        flat_q.backward(leaf.grad)
    return torch.tensor(total), out
