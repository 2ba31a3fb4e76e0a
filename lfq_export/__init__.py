"""lfq-export: LFQ post-training quantization of HF decoder LLMs, exported losslessly.

Public API (the CLI calls exactly these):
    quantize.quantize(model, out, QuantizeOptions(...)) -> run directory
    QuantizedModel.load(run_dir) -> record
    simulate.simulate(record) -> torch model with the exact quantized weights
    evaluate(...) -> quality metrics against the FP model
    export(record_or_dir, format, out, options) / verify(path, run_dir, options)
"""

__version__ = "0.1.0"

from .errors import LfqError  # noqa: E402

__all__ = ["__version__", "LfqError", "quantize", "QuantizeOptions", "QuantizedModel", "simulate"]


def __getattr__(name):  # lazy: importing the package must not import torch/transformers
    if name in ("quantize", "QuantizeOptions"):
        # importlib, not `from . import quantize`: the latter looks the name up on this package
        # first, which lands back here. `lfq_export.quantize` is the module (as it is once any
        # code imports it); the function is `lfq_export.quantize.quantize`.
        import importlib

        module = importlib.import_module(".quantize", __name__)
        return module if name == "quantize" else module.QuantizeOptions
    if name == "QuantizedModel":
        from .record import QuantizedModel

        return QuantizedModel
    if name == "simulate":  # the module, like `quantize` (its function is simulate.simulate)
        import importlib

        return importlib.import_module(".simulate", __name__)
    raise AttributeError(name)
