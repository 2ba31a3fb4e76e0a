"""A fused CPU kernel for the straight-through fake-quantization (`base.fake_quantize`).

Eagerly, one fake-quantization is a dozen weight-sized tensor passes forward and a handful backward;
on a 2-core AVX2 CPU that was ~30 % of a profiled optimisation step of a SmolLM2 block. This kernel
does the forward in one pass over the weight (read `w`, write the value) and the backward in one more
(read `w` and the incoming gradient, write the weight/divisor gradients and the per-group scale/zero
sums): `x = z + (w / d) / s`, `q = clamp(round_half_even(x), 0, qmax)`, value `s·(q − z)` (or the
codes, for the grid's own `dequantize`), and in the backward the same `x`, recomputed bit for bit instead of stored.

Every forward operation is one IEEE-754 fp32 operation in torch's order (divide, divide, add, round
half to even, clamp, subtract, multiply), compiled without contraction or fast-math, so the value is
bit-identical to `grid.dequantize(grid.choose_codes(...))` (tests/test_gguf_grids.py checks it on
every grid, tests/test_fused_quant.py across thread counts); the backward's per-group sums run in
fixed partial sums, the same on every vector width.

Compiled on first use and called through ctypes (`lfq_export.ckernels`), the rows split over torch's
intra-op thread count. Without a compiler, on other devices, or with `LFQ_EXPORT_FUSED_QUANT=0`,
`fake_quantize` uses the eager implementation: same values.
"""

from __future__ import annotations

import ctypes

import torch

from .. import ckernels
from ..ckernels import ptr as _ptr

__all__ = ["fused_available", "fused_forward", "fused_backward"]

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* the unrounded code x = z + (w / d) / s (torch's order: `code_coordinates`; a zero scale counts as 1) */
static inline float coordinate(float w, float d, int has_d, float safe, float z) {
    return z + (has_d ? w / d : w) / safe;
}

static inline float clamp_code(float r, float qmax) {
    return r < 0.0f ? 0.0f : (r > qmax ? qmax : r);
}

/* rows [row0, row1) of a [rows, ng*g] weight; s, z are [rows, ng]; d is NULL or like w.
   value != NULL: write s*(q - z) (the affine value); else write the codes q into codes. */
static inline void fwd_rows(const float *restrict w, const float *restrict d, int has_d, const float *restrict s,
                            const float *restrict z, float *restrict value, float *restrict codes,
                            int64_t row0, int64_t row1, int64_t ng, int64_t g, float qmax) {
    for (int64_t grp = row0 * ng; grp < row1 * ng; grp++) {
        const float sv = s[grp], zv = z[grp], safe = sv == 0.0f ? 1.0f : sv;
        const int64_t o = grp * g;
        for (int64_t j = 0; j < g; j++) {
            const float q = clamp_code(nearbyintf(coordinate(w[o + j], has_d ? d[o + j] : 1.0f, has_d, safe, zv)), qmax);
            if (value) value[o + j] = sv * (q - zv);
            else codes[o + j] = q;
        }
    }
}

void stq_forward(const float *w, const float *d, const float *s, const float *z, float *value, float *codes,
                 int64_t rows, int64_t ng, int64_t g, float qmax, int64_t nthreads) {
    FOR_SLICES(rows, nthreads, row0, row1, {
        if (d) fwd_rows(w, d, 1, s, z, value, codes, row0, row1, ng, g, qmax);
        else fwd_rows(w, d, 0, s, z, value, codes, row0, row1, ng, g, qmax);
    })
}

#define CHUNK 256
#define LANES 8
/* the backward of one chunk of a group (n <= CHUNK elements from k0); has_d is a constant at each call, so
   the branches fold away. The element loop has no reduction (so it vectorises without reassociating
   anything); the per-element terms are then summed in LANES fixed partial sums: the same order on every
   vector width, hence the same gradients on AVX2 and AVX-512 machines. */
static inline void bwd_chunk(const float *restrict gr, const float *restrict w, const float *restrict d,
                             int has_d, int64_t k0, int64_t n, float zv, float safe, float live, float qmax,
                             float *restrict grad_w, float *restrict grad_d, float *restrict acc_s,
                             float *restrict acc_out) {
    float ts[CHUNK], to[CHUNK];
    for (int64_t j = 0; j < n; j++) {
        const int64_t k = k0 + j;
        const float dk = has_d ? d[k] : 1.0f;
        const float x = coordinate(w[k], dk, has_d, safe, zv);
        const float r = nearbyintf(x);
        const float q = clamp_code(r, qmax);
        const float m = (r == q ? 1.0f : 0.0f) * live;
        const float gk = gr[k];
        ts[j] = gk * ((q - zv) - m * (x - zv));
        to[j] = gk - gk * m;
        const float gin = has_d ? (gk * m) / dk : gk * m;
        grad_w[k] = gin;
        if (has_d) grad_d[k] = -((gin * w[k]) / dk);
    }
    for (int64_t j = n; j < (n + LANES - 1) / LANES * LANES; j++) ts[j] = to[j] = 0.0f;
    for (int64_t j = 0; j < n; j += LANES)
        for (int l = 0; l < LANES; l++) {
            acc_s[l] += ts[j + l];
            acc_out[l] += to[j + l];
        }
}

static inline void bwd_rows(const float *restrict gr, const float *restrict w, const float *restrict d, int has_d,
                            const float *restrict s, const float *restrict z, float *restrict grad_w,
                            float *restrict grad_d, float *restrict grad_s, float *restrict grad_z,
                            int64_t row0, int64_t row1, int64_t ng, int64_t g, float qmax) {
    for (int64_t grp = row0 * ng; grp < row1 * ng; grp++) {
        const float sv = s[grp], zv = z[grp], safe = sv == 0.0f ? 1.0f : sv;
        const float live = sv == 0.0f ? 0.0f : 1.0f;
        float as[LANES] = {0}, ao[LANES] = {0};
        for (int64_t j = 0; j < g; j += CHUNK)
            bwd_chunk(gr, w, d, has_d, grp * g + j, g - j < CHUNK ? g - j : CHUNK, zv, safe, live, qmax,
                      grad_w, grad_d, as, ao);
        float acc_s = 0.0f, acc_out = 0.0f;
        for (int l = 0; l < LANES; l++) {
            acc_s += as[l];
            acc_out += ao[l];
        }
        grad_s[grp] = acc_s;
        grad_z[grp] = -sv * acc_out;
    }
}

/* gradients of the straight-through value, with m = "x rounds inside [0, qmax] and s != 0":
   grad_w = m*gr/d, grad_d = -m*(gr/d)*w/d (when d is given), grad_s = sum(q - z - m*(x - z)),
   grad_z = -s*sum((1-m)*gr). */
void stq_backward(const float *restrict gr, const float *restrict w, const float *restrict d,
                  const float *restrict s, const float *restrict z, float *restrict grad_w,
                  float *restrict grad_d, float *restrict grad_s, float *restrict grad_z,
                  int64_t rows, int64_t ng, int64_t g, float qmax, int64_t nthreads) {
    FOR_SLICES(rows, nthreads, row0, row1, {
        if (d) bwd_rows(gr, w, d, 1, s, z, grad_w, grad_d, grad_s, grad_z, row0, row1, ng, g, qmax);
        else bwd_rows(gr, w, d, 0, s, z, grad_w, grad_d, grad_s, grad_z, row0, row1, ng, g, qmax);
    })
}
"""

def _library():
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    return ckernels.load("stq", _SOURCE, {
        "stq_forward": [p, p, p, p, p, p, i64, i64, i64, f32, i64],
        "stq_backward": [p, p, p, p, p, p, p, p, p, i64, i64, i64, f32, i64],
    }, switch="LFQ_EXPORT_FUSED_QUANT")


def fused_available(*tensors: torch.Tensor | None) -> bool:
    """True when the kernel can take these tensors (fp32, on the CPU) and it compiled."""
    ok = all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)
    return ok and _library() is not None


def _threads() -> int:
    return torch.get_num_threads()


def fused_forward(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, divisor: torch.Tensor | None,
                  qmax: int, affine_value: bool) -> torch.Tensor:
    """`[out, in]` float32: the value `s·(q − z)` if `affine_value`, else the codes `q` as floats.
    `s`, `z` are `[out, groups]`; `w`, `divisor` `[out, in]`; all contiguous float32."""
    out, inn = w.shape
    ng = s.shape[-1]
    result = torch.empty_like(w)
    value, codes = (result, None) if affine_value else (None, result)
    _library().stq_forward(_ptr(w), _ptr(divisor), _ptr(s), _ptr(z), _ptr(value), _ptr(codes), out, ng, inn // ng,
                           float(qmax), _threads())
    return result


def fused_backward(grad: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                   divisor: torch.Tensor | None, qmax: int, need_w: bool, need_d: bool, need_s: bool,
                   need_z: bool) -> tuple[torch.Tensor | None, ...]:
    """`(grad_w, grad_d, grad_s, grad_z)` of the straight-through value (None where not needed)."""
    out, inn = w.shape
    ng = s.shape[-1]
    grad = grad.contiguous()
    gw = torch.empty_like(w)  # the kernel always writes every gradient (a branch-free loop)
    gd = None if divisor is None else torch.empty_like(w)
    gs, gz = torch.empty_like(s), torch.empty_like(s)
    _library().stq_backward(_ptr(grad), _ptr(w), _ptr(divisor), _ptr(s), _ptr(z), _ptr(gw), _ptr(gd), _ptr(gs),
                            _ptr(gz), out, ng, inn // ng, float(qmax), _threads())
    return gw if need_w else None, gd if need_d else None, gs if need_s else None, gz if need_z else None
