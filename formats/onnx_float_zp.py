"""Why offset grids (`w = d·q + m`: GGUF q4_1, q5_1, q2_k, q4_k, q5_k) are not exported to ONNX.

MatMulNBits accepts float zero points (type of A) for 2- and 4-bit weights on CPU (8-bit with a float
zero point is rejected at session creation). ONNX Runtime then dequantizes with
(`contrib_ops/cpu/quantization/matmul_nbits_impl.cc`, `Dequantize4BitsKernelReOrder`):

    zp_adjust = −scale · zp          (one fp32 rounding)
    w         = q · scale + zp_adjust (q · scale is exact; one more rounding)

`ort_float_zp_formula_holds` checks that formula against the installed onnxruntime bit for bit (an
identity activation matrix makes the op return its dequantized weight). For code 0 the weight is
`fl(−d·zp)`, so exact storage of `d·q + m` needs an fp32 `zp` with `fl(−d·zp) = m`.
`unreachable_fraction` counts, over all 2^20 pairs of fp16 mantissas (d, m) — the answer is
invariant under scaling either by a power of two — the pairs for which no fp32 `zp` exists: 11.2 %.
A q4_1 group hits such a pair about one time in nine, so the grid cannot be stored exactly.
Run `python -m formats.onnx_float_zp` to print both results.
"""

from __future__ import annotations

import numpy as np

__all__ = ["unreachable_fraction", "ort_float_zp_formula_holds"]


def unreachable_fraction(search_ulps: int = 4) -> float:
    """Fraction of fp16 mantissa pairs (d, m) in [1, 2)² with no fp32 z such that fl(d·z) = m.

    Any solution lies within an ulp or two of m/d; candidates up to `search_ulps` ulps away are tried."""
    mant = (np.arange(1024, 2048, dtype=np.float32) / np.float32(1024))
    d = np.repeat(mant[:, None], 1024, axis=1)
    m = np.repeat(mant[None, :], 1024, axis=0)
    z0 = (m / d).astype(np.float32)
    found = (d * z0) == m
    for direction in (np.float32(np.inf), np.float32(0)):
        z = z0
        for _ in range(search_ulps):
            z = np.nextafter(z, direction)
            found |= (d * z) == m
    return float(1.0 - found.mean())


def ort_float_zp_formula_holds(bits: int = 4, seed: int = 0) -> bool:
    """Does the installed onnxruntime dequantize float zero points as `q·s + fl(−s·zp)`, bit for bit?"""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    n, k, block = 32, 64, 32
    kb = k // block
    q = rng.integers(0, 1 << bits, size=(n, k)).astype(np.uint8)
    s = (rng.standard_normal((n, kb)) * 0.05).astype(np.float16).astype(np.float32)
    zp = (rng.random((n, kb)) * ((1 << bits) - 1)).astype(np.float32)
    per = 8 // bits
    packed = np.zeros((n, k // per), np.uint8)
    for j in range(per):
        packed |= (q[:, j::per] << (bits * j)).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block)
    graph = helper.make_graph(
        [node], "float_zp_probe", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])],
        [numpy_helper.from_array(packed.reshape(n, kb, -1), "B"), numpy_helper.from_array(s, "S"),
         numpy_helper.from_array(zp, "Z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    w = sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0].T
    blk = np.arange(k) // block
    expect = q.astype(np.float32) * s[:, blk] + (-s * zp)[:, blk]
    return bool(np.array_equal(w.view(np.uint32), expect.view(np.uint32)))


if __name__ == "__main__":
    print(f"onnxruntime float zero points dequantize as q·s + fl(−s·zp): "
          f"{ort_float_zp_formula_holds(4) and ort_float_zp_formula_holds(2)}")
    print(f"fp16 (d, m) mantissa pairs with no fp32 zp such that fl(d·zp) = m: {unreachable_fraction():.4f}")
