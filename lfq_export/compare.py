"""Comparisons shared by every format's `verify` and by evaluation: weights bit for bit, logits
within an engine's arithmetic, greedy text. Pure functions over arrays; no format knowledge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["compare_weights", "compare_logits", "kl_per_token", "first_divergence"]


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def compare_weights(reference: Mapping[str, Any], from_file: Mapping[str, Any]) -> dict[str, Any]:
    """Bit-for-bit comparison of two name → float32 weight maps.

    Returns `weights_exact`, the number of tensors compared, and for mismatches the names with the
    count of differing elements and the largest difference (to debug, never to tolerate)."""
    missing = sorted(set(reference) - set(from_file))
    extra = sorted(set(from_file) - set(reference))
    mismatches: dict[str, dict[str, float]] = {}
    for name in sorted(set(reference) & set(from_file)):
        a, b = _np(reference[name]), _np(from_file[name])
        if a.shape != b.shape:
            mismatches[name] = {"shape_ref": list(a.shape), "shape_file": list(b.shape)}
            continue
        if not np.array_equal(a.view(np.uint32), b.view(np.uint32)) and not np.array_equal(a, b):
            diff = np.abs(a - b)
            mismatches[name] = {"n_diff": int((a != b).sum()), "max_abs": float(np.nanmax(diff))}
    return {
        "weights_exact": not missing and not mismatches,
        "tensors_compared": len(set(reference) & set(from_file)),
        "missing_in_file": missing,
        "extra_in_file": extra,
        "mismatches": mismatches,
    }


def kl_per_token(ref_logits: Any, test_logits: Any) -> np.ndarray:
    """KL(softmax(ref) ‖ softmax(test)) for each row, in float64."""
    a = _np(ref_logits).astype(np.float64)
    b = _np(test_logits).astype(np.float64)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    return (np.exp(la) * (la - lb)).sum(-1)


def compare_logits(ref_logits: Any, test_logits: Any) -> dict[str, float]:
    """Engine logits against reference logits (rows = tokens): top-1 agreement, KL, error sizes."""
    a = _np(ref_logits).reshape(-1, _np(ref_logits).shape[-1])
    b = _np(test_logits).reshape(-1, _np(test_logits).shape[-1])
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {a.shape} vs {b.shape}")
    kl = kl_per_token(a, b)
    return {
        "tokens": int(a.shape[0]),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "max_abs_diff": float(np.abs(a - b).max()),
        "rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)),
    }


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the common prefix length)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
