"""A fused CPU kernel for the soft cross-entropy over vocab-major logits (`lfq_loss`).

For student logits z and teacher logits (or log-probabilities) u, both `[vocab, tokens]`, the LFQ
loss needs per token the student's log-normaliser, Σ_v p_v·z_v (p = softmax(u)), for the diagnostics
Σ p·log p and both argmaxes, and for the backward the `[vocab, tokens]` gradient softmax(z) − p times a
per-token weight. Eagerly that is about ten vocabulary-sized passes (max, subtract, exp, sum for each
log-normaliser, the products, the gradient, the cast to bf16): 40 % of an LFQ step's head time on a
2-core AVX-512 CPU. Here it is three: column maxima and argmaxes, the exponential sums, and the gradient
(written straight in the matmul's dtype).

Numerics: exp is Cephes' single-precision polynomial (within 2 ulp of the correctly rounded value;
its input is z − max ≤ 0, and values below e^−87 flush to 0), every vocabulary sum is accumulated in
double in vocabulary order — one column per lane, so the result does not depend on the vector width or
the thread split — and bf16 gradients are rounded to nearest even, as torch's cast does.
tests/test_lfq.py checks the kernel against the eager loss, gradient and statistics.
"""

from __future__ import annotations

import ctypes

import torch

from . import ckernels
from .ckernels import ptr

__all__ = ["ce_kernel_available", "column_terms", "softmax_gap"]

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) for x <= 0 (Cephes expf: 2^n * P(r), r = x - n ln2 in two parts); 0 below -87. */
static inline float exp_nonpos(float x) {
    const float tiny = x < -87.0f ? 0.0f : 1.0f;
    x = x < -87.0f ? -87.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round to nearest */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * scale.f * tiny;
}

#define TILE 64

/* Columns [c0, c1) of z and u ([V, T], rows ldz and ldu floats apart): per column t,
   lse_z = log sum exp z, lse_u = log sum exp u, pz = sum p z, pu = sum p u (p = softmax(u)),
   and (arg != 0) the first argmax of each. */
static void columns(const float *restrict z, const float *restrict u, int64_t c0, int64_t c1, int64_t V,
                    int64_t ldz, int64_t ldu, float *restrict lse_z, float *restrict lse_u, float *restrict pz,
                    float *restrict pu, int64_t *restrict arg_z, int64_t *restrict arg_u) {
    for (int64_t t0 = c0; t0 < c1; t0 += TILE) {
        const int64_t w = c1 - t0 < TILE ? c1 - t0 : TILE;
        float mz[TILE], mu[TILE];
        int64_t iz[TILE], iu[TILE];
        for (int64_t j = 0; j < w; j++) {
            mz[j] = -INFINITY; mu[j] = -INFINITY; iz[j] = 0; iu[j] = 0;
        }
        for (int64_t v = 0; v < V; v++) {
            const float *zr = z + v * ldz + t0, *ur = u + v * ldu + t0;
            for (int64_t j = 0; j < w; j++) {
                if (zr[j] > mz[j]) { mz[j] = zr[j]; iz[j] = v; }
                if (ur[j] > mu[j]) { mu[j] = ur[j]; iu[j] = v; }
            }
        }
        double sz[TILE], su[TILE], spz[TILE], spu[TILE];
        for (int64_t j = 0; j < w; j++) sz[j] = su[j] = spz[j] = spu[j] = 0.0;
        for (int64_t v = 0; v < V; v++) {
            const float *zr = z + v * ldz + t0, *ur = u + v * ldu + t0;
            for (int64_t j = 0; j < w; j++) {
                const float ez = exp_nonpos(zr[j] - mz[j]);
                const float eu = exp_nonpos(ur[j] - mu[j]);
                sz[j] += (double)ez;
                su[j] += (double)eu;
                spz[j] += (double)eu * (double)zr[j];
                spu[j] += (double)eu * (double)ur[j];
            }
        }
        for (int64_t j = 0; j < w; j++) {
            const int64_t t = t0 + j;
            lse_z[t] = mz[j] + (float)log(sz[j]);
            lse_u[t] = mu[j] + (float)log(su[j]);
            pz[t] = (float)(spz[j] / su[j]);
            pu[t] = (float)(spu[j] / su[j]);
            if (arg_z) { arg_z[t] = iz[j]; arg_u[t] = iu[j]; }
        }
    }
}

static inline uint16_t to_bf16(float x) {  /* round to nearest even, as torch's cast */
    union { float f; uint32_t u; } b = {x};
    return (uint16_t)((b.u + 0x7FFFu + ((b.u >> 16) & 1u)) >> 16);
}

/* Rows [r0, r1) (g is [V, T] contiguous): g[v, t] = (exp(z - lse_z[t]) - exp(u - lse_u[t])) * scale[t], as fp32
   (bf16 == 0) or bf16 (bf16 != 0). */
static void gap_rows(const float *restrict z, const float *restrict u, const float *restrict lse_z,
                     const float *restrict lse_u, const float *restrict scale, void *restrict g, int64_t bf16,
                     int64_t r0, int64_t r1, int64_t T, int64_t ldz, int64_t ldu) {
    float row[TILE];
    for (int64_t v = r0; v < r1; v++) {
        for (int64_t t0 = 0; t0 < T; t0 += TILE) {
            const int64_t w = T - t0 < TILE ? T - t0 : TILE;
            const float *zr = z + v * ldz + t0, *ur = u + v * ldu + t0;
            for (int64_t j = 0; j < w; j++)
                row[j] = (exp_nonpos(zr[j] - lse_z[t0 + j]) - exp_nonpos(ur[j] - lse_u[t0 + j])) * scale[t0 + j];
            if (bf16) {
                uint16_t *gr = (uint16_t *)g + v * T + t0;
                for (int64_t j = 0; j < w; j++) gr[j] = to_bf16(row[j]);
            } else {
                memcpy((float *)g + v * T + t0, row, (size_t)w * sizeof(float));
            }
        }
    }
}

/* the per-column terms of T columns (split over threads by columns: each column is one thread's) */
void ce_columns(const float *z, const float *u, int64_t V, int64_t T, int64_t ldz, int64_t ldu, float *lse_z,
                float *lse_u, float *pz, float *pu, int64_t *arg_z, int64_t *arg_u, int64_t nthreads) {
    FOR_SLICES(T, nthreads, c0, c1, columns(z, u, c0, c1, V, ldz, ldu, lse_z, lse_u, pz, pu, arg_z, arg_u);)
}

/* the gradient of V rows (split over threads by rows) */
void ce_gap(const float *z, const float *u, const float *lse_z, const float *lse_u, const float *scale, void *g,
            int64_t bf16, int64_t V, int64_t T, int64_t ldz, int64_t ldu, int64_t nthreads) {
    FOR_SLICES(V, nthreads, r0, r1, gap_rows(z, u, lse_z, lse_u, scale, g, bf16, r0, r1, T, ldz, ldu);)
}
"""


def _library() -> ctypes.CDLL | None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return ckernels.load("softce", _SOURCE, {
        "ce_columns": [p, p, i64, i64, i64, i64, p, p, p, p, p, p, i64],
        "ce_gap": [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64],
    }, switch="LFQ_EXPORT_FUSED_CE")


def ce_kernel_available(*tensors: torch.Tensor) -> bool:
    """True when the kernel compiled and takes these `[V, T]` tensors (fp32 on the CPU, unit column stride:
    column slices of a wider matrix are fine)."""
    ok = all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2 and t.stride(1) == 1
             for t in tensors)
    return ok and _library() is not None


def column_terms(z: torch.Tensor, u: torch.Tensor, argmax: bool = False):
    """Per token (column) of `[V, T]` student logits `z` and teacher logits `u`: `(lse_z, lse_u, Σ p·z,
    Σ p·u, argmax_z, argmax_u)`, p = softmax(u); the argmaxes are None unless `argmax`."""
    V, T = z.shape
    lse_z, lse_u, pz, pu = (torch.empty(T) for _ in range(4))
    arg_z = torch.empty(T, dtype=torch.int64) if argmax else None
    arg_u = torch.empty(T, dtype=torch.int64) if argmax else None
    _library().ce_columns(ptr(z), ptr(u), V, T, z.stride(0), u.stride(0), ptr(lse_z), ptr(lse_u), ptr(pz), ptr(pu),
                          ptr(arg_z), ptr(arg_u), torch.get_num_threads())
    return lse_z, lse_u, pz, pu, arg_z, arg_u


def softmax_gap(z: torch.Tensor, u: torch.Tensor, lse_z: torch.Tensor, lse_u: torch.Tensor,
                scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`(softmax(z) − softmax(u)) · scale` per column, `[V, T]` in `dtype` (float32 or bfloat16)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"softmax_gap writes float32 or bfloat16, not {dtype}")
    V, T = z.shape
    g = torch.empty(V, T, dtype=dtype)
    scale = scale.to(torch.float32).contiguous()
    _library().ce_gap(ptr(z), ptr(u), ptr(lse_z), ptr(lse_u), ptr(scale), ptr(g), int(dtype == torch.bfloat16), V, T,
                      z.stride(0), u.stride(0), torch.get_num_threads())
    return g
