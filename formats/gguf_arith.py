"""A model of llama.cpp's CPU matmul arithmetic, to size the deviation a quantized GGUF must show.

llama.cpp multiplies a quantized weight with *quantized activations* (ggml-cpu `vec_dot_type`):
Q4_0/Q5_0/Q8_0 weights with Q8_0 activations (int8 per 32, fp16 scale), Q4_1/Q5_1 with Q8_1
(the same values), K-quants with Q8_K (int8 per 256, fp32 scale), F16 weights with F16 activations;
F32 weights see F32 activations. That rounding — not the file — is why a quantized GGUF's logits
differ from `simulate()` by a few percent. Applying the same rounding to the inputs of the simulated
model's linears (forward pre-hooks) reproduces llama.cpp to ~1e-6 when one tensor is quantized;
with every tensor quantized, near-tie roundings that differ by float summation order compound
through the layers, so the hooked model then predicts the *size* of llama.cpp's deviation (measured:
rel. L2 within 1 % on stories260K, within 10 % on SmolLM2), not its values. `verify` uses it as that yardstick.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import gguf
import torch
from torch import nn

__all__ = ["ACTIVATION_TYPE", "quantize_activations", "llamacpp_activations"]

T = gguf.GGMLQuantizationType

#: weight type → activation format of its CPU dot product (None: activations stay F32)
ACTIVATION_TYPE: dict[gguf.GGMLQuantizationType, str | None] = {
    T.F32: None, T.F16: "f16",
    T.Q4_0: "q8_0", T.Q5_0: "q8_0", T.Q8_0: "q8_0",
    T.Q4_1: "q8_1", T.Q5_1: "q8_1",
    T.Q2_K: "q8_k", T.Q3_K: "q8_k", T.Q4_K: "q8_k", T.Q5_K: "q8_k", T.Q6_K: "q8_k",
}


def quantize_activations(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    """`x` as the dot product sees it after ggml quantizes it to `kind` (float32 values)."""
    if kind is None:
        return x
    if kind == "f16":
        return x.to(torch.float16).to(x.dtype)
    block = 256 if kind == "q8_k" else 32
    xs = x.float().reshape(-1, block)
    if kind == "q8_k":  # quantize_row_q8_K: iscale = −127/max (signed max), d = 1/iscale in fp32
        mx = xs.gather(-1, xs.abs().argmax(-1, keepdim=True))
        iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
        q = torch.clamp(torch.round(iscale * xs), max=127)
        d = torch.where(iscale != 0, 1.0 / iscale, torch.zeros_like(iscale))
        return (q * d).reshape(x.shape).to(x.dtype)
    amax = xs.abs().amax(-1, keepdim=True)  # quantize_row_q8_0 / q8_1: d = amax/127 stored fp16
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xs * inv)
    d = (amax / 127.0).to(torch.float16).float()
    return (q * d).reshape(x.shape).to(x.dtype)


@contextmanager
def llamacpp_activations(model: nn.Module, types: dict[str, gguf.GGMLQuantizationType]) -> Iterator[nn.Module]:
    """Within the context, every linear of `model` named in `types` (module name → its weight's
    ggml type) quantizes its input as llama.cpp's CPU backend does for that type."""
    handles = []
    try:
        for name, module in model.named_modules():
            kind = ACTIVATION_TYPE.get(types[name]) if name in types else None
            if isinstance(module, nn.Linear) and kind is not None:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, kind=kind: (quantize_activations(args[0], kind),) + tuple(args[1:])))
        yield model
    finally:
        for h in handles:
            h.remove()
