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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LogitHead", "soft_ce", "chunked_soft_ce_backward", "CEStats"]


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
        return F.linear(self.norm(h), self.weight, self.bias).float()


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
    m = torch.ones(hq.shape[0]) if mask is None else mask.reshape(-1).float()
    ce, _, _ = _chunk_terms(head, hq, hf, m)
    return ce.sum() / m.sum().clamp(min=1)


def chunked_soft_ce_backward(
    head: LogitHead,
    h_q: torch.Tensor,
    h_fp: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    backward: bool = True,
) -> tuple[torch.Tensor, CEStats]:
    """Token-mean soft CE computed chunk by chunk; if `backward`, gradients flow into `h_q`'s graph.

    Returns the loss value (detached) and summed statistics."""
    shape = h_q.shape
    flat_q = h_q.reshape(-1, shape[-1])
    flat_fp = h_fp.reshape(-1, shape[-1]).to(flat_q.dtype)
    m = torch.ones(flat_q.shape[0]) if mask is None else mask.reshape(-1).float()
    n_valid = m.sum().clamp(min=1)
    leaf = flat_q.detach().requires_grad_(backward)
    stats = CEStats(tokens=float(m.sum()))
    total = torch.zeros(())
    for a in range(0, flat_q.shape[0], chunk_tokens):
        b = min(a + chunk_tokens, flat_q.shape[0])
        with torch.set_grad_enabled(backward):
            ce, ent, agree = _chunk_terms(head, leaf[a:b], flat_fp[a:b], m[a:b])
            loss_c = ce.sum() / n_valid
            if backward:
                loss_c.backward()
        total += loss_c.detach()
        stats.ce += float(ce.detach().sum())
        stats.kl += float((ce.detach() - ent).sum())
        stats.top1_agree += float(agree.sum())
    if backward:
        flat_q.backward(leaf.grad)
    return total, stats
