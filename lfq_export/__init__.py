"""lfq-export: LFQ post-training quantization of HF decoder LLMs, exported losslessly.

Public API (the CLI calls exactly these):
    quantize(model, out, QuantizeOptions(...)) -> run directory
    QuantizedModel.load(run_dir) -> record
    simulate(record) -> torch model with the exact quantized weights
    evaluate(...) -> quality metrics against the FP model
    export(record_or_dir, format, out, options) / verify(path, run_dir, options)
"""

__version__ = "0.1.0"

from .errors import LfqError  # noqa: E402

__all__ = ["__version__", "LfqError", "quantize", "QuantizeOptions", "QuantizedModel", "simulate"]


def __getattr__(name):  # lazy: importing the package must not import torch/transformers
    if name in ("quantize", "QuantizeOptions"):
        from . import quantize as q

        return getattr(q, name)
    if name == "QuantizedModel":
        from .record import QuantizedModel

        return QuantizedModel
    if name == "simulate":
        from .simulate import simulate

        return simulate
    raise AttributeError(name)
