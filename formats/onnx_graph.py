"""Build the ONNX decoder graph of a quantized record (llama, mistral, qwen2, qwen3).

The graph is the layout onnxruntime-genai expects from its own model builder, built node by node
with `onnx.helper` (no templates):

    input_ids → Gather(embed) → per layer:
        SimplifiedLayerNorm → MatMulNBits(q|k|v) → [q/k RMSNorm] → GroupQueryAttention → MatMulNBits(o)
        SkipSimplifiedLayerNorm (residual add + RMSNorm) → MatMulNBits(gate|up) → SiLU·up → MatMulNBits(down)
    → SkipSimplifiedLayerNorm(final norm) → Gemm(head) → logits

- GroupQueryAttention (com.microsoft) applies rotate-half RoPE itself from `cos_cache`/`sin_cache`
  (computed by the family's own HF rotary module, so rope theta/scaling and the attention factor
  match HF bit for bit), does GQA, the causal mask, a sliding window where the config has one, and
  appends to the KV cache. So the graph needs no `position_ids` input: positions come from the
  attention mask (`seqlens_k = Σmask − 1`, `total_sequence_length = mask width`).
- Every quantized linear is a MatMulNBits node; q/k/v and gate/up are fused along N when their
  grids share a layout (exact: rows are independent). Biases (Qwen2) ride in MatMulNBits' bias input.
- Unquantized linears are MatMul with the transposed FP weight; the head is Gemm(transB) on the HF
  `[vocab, hidden]` weight, shared with the embedding when tied (stored once).
- Qwen3's per-head q/k RMSNorm: Reshape to heads, SimplifiedLayerNormalization, Reshape back,
  before GroupQueryAttention's RoPE (HF's order).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from lfq_export.errors import FormatError
from lfq_export.record import QuantizedModel

from .onnx_pack import MnbWeight, concat_rows, pack_tensor
from .unpack_onnx import LINEARS_METADATA_KEY

__all__ = ["GraphOptions", "BuiltModel", "build_decoder", "OPSET", "MS_OPSET", "IR_VERSION", "check_config"]

OPSET = 21
MS_OPSET = 1
IR_VERSION = 10

_DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}
_STATIC_ROPE = ("default", "linear", "llama3", "yarn", "proportional")
_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


@dataclass(frozen=True)
class GraphOptions:
    """Graph-level choices.

    Attributes:
        dtype: activation/KV dtype, `float32` (CPU default, near-exact) or `float16`.
        accuracy_level: MatMulNBits `accuracy_level`; 0 = fp32 compute (exact dequantization),
            4 = int8 activations per block (faster on CPU, ~1e-2 relative logit error).
        fuse: fuse q/k/v and gate/up MatMulNBits nodes when their layouts match.
    """

    dtype: str = "float32"
    accuracy_level: int = 0
    fuse: bool = True


@dataclass
class BuiltModel:
    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)
    n_matmulnbits: int = 0


def check_config(config: dict[str, Any], family: str) -> str | None:
    """None if this config's architecture maps onto the graph exactly, else why not."""
    act = config.get("hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r} (only silu is built)"
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in _STATIC_ROPE:
        return f"rope type {rtype!r} depends on the sequence length (only {', '.join(_STATIC_ROPE)} are static)"
    if float(config.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return "partial rotary embeddings"
    if family in ("qwen2", "qwen3") and config.get("use_sliding_window") and config.get("layer_types") is None:
        return "use_sliding_window without layer_types"
    return None


# ---- small graph assembler ---------------------------------------------------------------------
class _Graph:
    """Nodes and initializers with unique names; `op` returns the output names."""

    def __init__(self, np_dtype: type, onnx_dtype: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.np_dtype = np_dtype
        self.onnx_dtype = onnx_dtype
        self._consts: dict[tuple, str] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const_i64(self, values: list[int]) -> str:
        key = ("i64",) + tuple(values)
        if key not in self._consts:
            self._consts[key] = self.init(f"const_i64_{'_'.join(str(v).replace('-', 'm') for v in values)}",
                                          np.array(values, np.int64))
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs: Any) -> list[str]:
        outs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs


# ---- the decoder ---------------------------------------------------------------------------------
def build_decoder(record: QuantizedModel, options: GraphOptions = GraphOptions()) -> BuiltModel:
    """The full decoder as an in-memory ModelProto (initializers inline; the writer externalises)."""
    why = check_config(record.config, record.family)
    if why:
        raise FormatError(f"onnx cannot build this {record.family} model exactly: {why}")
    if options.dtype not in _DTYPES:
        raise FormatError(f"onnx dtype {options.dtype!r}; choose float32 or float16")
    np_dt, onnx_dt = _DTYPES[options.dtype]
    b = _Decoder(record, options, _Graph(np_dt, onnx_dt))
    return b.build()


class _Decoder:
    def __init__(self, record: QuantizedModel, options: GraphOptions, g: _Graph) -> None:
        self.r, self.o, self.g = record, options, g
        c = record.config
        self.n_layers = int(c["num_hidden_layers"])
        self.hidden = int(c["hidden_size"])
        self.n_heads = int(c["num_attention_heads"])
        self.n_kv = int(c.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(c.get("head_dim") or self.hidden // self.n_heads)
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        self.vocab = int(c["vocab_size"])
        self.linears: dict[str, list[list]] = {}  # node name → [[hf name, start, stop], ...]
        self.notes: list[str] = []
        self.n_mnb = 0

    # -- tensors ------------------------------------------------------------------------------
    def fp(self, name: str) -> np.ndarray | None:
        t = self.r.fp.get(name)
        return None if t is None else t.detach().to(torch.float32).numpy()

    def act(self, a: np.ndarray) -> np.ndarray:
        return a.astype(self.g.np_dtype)

    # -- graph pieces -------------------------------------------------------------------------
    def build(self) -> BuiltModel:
        g = self.g
        seqlens, total = self._mask_inputs()
        cos, sin = self._rope_caches()
        emb = g.init("model.embed_tokens.weight", self.act(self.fp("model.embed_tokens.weight")))
        x = g.op("Gather", [emb, "input_ids"], "/model/embed_tokens/Gather")[0]
        residual, pending = x, None
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            h, residual = self._norm_add(residual, pending, p + "input_layernorm.weight",
                                         f"/model/layers.{i}/input_layernorm")
            attn = self._attention(i, h, seqlens, total, cos, sin)
            h, residual = self._norm_add(residual, attn, p + "post_attention_layernorm.weight",
                                         f"/model/layers.{i}/post_attention_layernorm")
            pending = self._mlp(i, h)
        h, _ = self._norm_add(residual, pending, "model.norm.weight", "/model/norm")
        self._head(h)
        return BuiltModel(self._model(), self.notes, self.n_mnb)

    def _mask_inputs(self) -> tuple[str, str]:
        """GroupQueryAttention's `seqlens_k` (valid length − 1, int32 [batch]) and
        `total_sequence_length` (int32 scalar), both from the attention mask."""
        g = self.g
        s = g.op("ReduceSum", ["attention_mask", g.const_i64([1])], "/model/attn_mask/ReduceSum", keepdims=0)[0]
        s = g.op("Sub", [s, g.const_i64([1])], "/model/attn_mask/Sub")[0]
        seqlens = g.op("Cast", [s], "/model/attn_mask/seqlens_k", to=TensorProto.INT32)[0]
        shape = g.op("Shape", ["attention_mask"], "/model/attn_mask/Shape")[0]
        width = g.op("Gather", [shape, g.init("const_i64_scalar_1", np.array(1, np.int64))],
                     "/model/attn_mask/Gather", axis=0)[0]
        total = g.op("Cast", [width], "/model/attn_mask/total_seq_len", to=TensorProto.INT32)[0]
        return seqlens, total

    def _rope_caches(self) -> tuple[str, str]:
        cos, sin = rope_cos_sin(self.r.config, self.r.family)
        half = self.head_dim // 2
        return (self.g.init("cos_cache", self.act(cos[:, :half])), self.g.init("sin_cache", self.act(sin[:, :half])))

    def _norm_add(self, residual: str, add: str | None, weight: str, name: str) -> tuple[str, str]:
        """RMSNorm of `residual + add` (HF: residual add in the activation dtype, then the norm);
        returns (normed, new residual)."""
        g = self.g
        w = g.init(weight, self.act(self.fp(weight)))
        if add is None:
            return g.op("SimplifiedLayerNormalization", [residual, w], name, axis=-1, epsilon=self.eps,
                        stash_type=1)[0], residual
        outs = g.op("SkipSimplifiedLayerNormalization", [residual, add, w], name, domain="com.microsoft",
                    outputs=[f"{name}/output_0", "", "", f"{name}/output_3"], epsilon=self.eps)
        return outs[0], outs[3]

    def _attention(self, i: int, h: str, seqlens: str, total: str, cos: str, sin: str) -> str:
        g, p, name = self.g, f"model.layers.{i}.", f"/model/layers.{i}/attn"
        q, k, v = self._linears(h, [p + n for n in _ATTN], f"{name}/qkv_proj")
        if self.r.family == "qwen3" or p + "self_attn.q_norm.weight" in self.r.fp:
            q = self._head_norm(q, p + "self_attn.q_norm.weight", self.n_heads, f"{name}/q_norm")
            k = self._head_norm(k, p + "self_attn.k_norm.weight", self.n_kv, f"{name}/k_norm")
        window = sliding_window(self.r.config, self.r.family, i)
        out = g.op(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total, cos, sin],
            f"{name}/GroupQueryAttention", domain="com.microsoft",
            outputs=[f"{name}/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
            num_heads=self.n_heads, kv_num_heads=self.n_kv, scale=float(self.head_dim**-0.5),
            do_rotary=1, rotary_interleaved=0, local_window_size=-1 if window is None else window,
        )[0]
        return self._linears(out, [p + "self_attn.o_proj"], f"{name}/o_proj")[0]

    def _head_norm(self, x: str, weight: str, heads: int, name: str) -> str:
        g = self.g
        x4 = g.op("Reshape", [x, g.const_i64([0, 0, heads, self.head_dim])], f"{name}/Reshape_heads")[0]
        w = g.init(weight, self.act(self.fp(weight)))
        n = g.op("SimplifiedLayerNormalization", [x4, w], f"{name}/LayerNorm", axis=-1, epsilon=self.eps,
                 stash_type=1)[0]
        return g.op("Reshape", [n, g.const_i64([0, 0, heads * self.head_dim])], f"{name}/Reshape_back")[0]

    def _mlp(self, i: int, h: str) -> str:
        g, p, name = self.g, f"model.layers.{i}.", f"/model/layers.{i}/mlp"
        gate, up = self._linears(h, [p + n for n in _GATE_UP], f"{name}/gate_up_proj")
        sig = g.op("Sigmoid", [gate], f"{name}/act_fn/Sigmoid")[0]
        silu = g.op("Mul", [gate, sig], f"{name}/act_fn/Mul")[0]
        prod = g.op("Mul", [silu, up], f"{name}/Mul")[0]
        return self._linears(prod, [p + "mlp.down_proj"], f"{name}/down_proj")[0]

    # -- linears ------------------------------------------------------------------------------
    def _linears(self, x: str, names: list[str], node_name: str) -> list[str]:
        """`x @ Wᵀ (+ b)` for each HF linear in `names`; one fused MatMulNBits when possible."""
        packed = [pack_tensor(self.r.quantized[n], self.g.np_dtype) if n in self.r.quantized else None for n in names]
        fusable = len(names) > 1 and self.o.fuse and all(p is not None for p in packed) and \
            len({p.signature() for p in packed}) == 1
        if fusable:
            y = self._mnb(x, concat_rows(packed), node_name, [self.fp(n + ".bias") for n in names])
            return self._split(y, [p.N for p in packed], node_name)
        outs = []
        for n, p in zip(names, packed):
            sub = node_name if len(names) == 1 else f"{node_name.rsplit('/', 1)[0]}/{n.rsplit('.', 1)[1]}"
            bias = self.fp(n + ".bias")
            outs.append(self._mnb(x, p, sub, [bias]) if p is not None else self._matmul(x, n, sub, bias))
        return outs

    def _mnb(self, x: str, w: MnbWeight, name: str, biases: list[np.ndarray | None]) -> str:
        g = self.g
        key = name.strip("/").replace("/", ".")
        inputs = [x, g.init(f"{key}.MatMulNBits.B", w.B), g.init(f"{key}.MatMulNBits.scales", self.act(w.scales))]
        inputs.append(g.init(f"{key}.MatMulNBits.zero_points", w.zero_points) if w.zero_points is not None else "")
        if any(b is not None for b in biases):
            sizes = [stop - start for _, start, stop in w.rows]
            full = np.concatenate([b if b is not None else np.zeros(n, np.float32) for b, n in zip(biases, sizes)])
            inputs += ["", g.init(f"{key}.MatMulNBits.bias", self.act(full))]
        while inputs and inputs[-1] == "":
            inputs.pop()
        self.linears[f"{name}/MatMulNBits"] = [list(r) for r in w.rows]
        self.n_mnb += 1
        self.notes += [n for n in w.notes if n not in self.notes]
        attrs = {"K": w.K, "N": w.N, "bits": w.bits, "block_size": w.block_size}
        if self.o.accuracy_level:
            attrs["accuracy_level"] = self.o.accuracy_level
        return g.op("MatMulNBits", inputs, f"{name}/MatMulNBits", domain="com.microsoft", **attrs)[0]

    def _matmul(self, x: str, hf_name: str, name: str, bias: np.ndarray | None) -> str:
        """An unquantized linear (kept in FP by the run)."""
        g = self.g
        w = self.fp(hf_name + ".weight")
        if w is None:
            raise FormatError(f"record has neither a quantized nor an FP weight for {hf_name}")
        key = name.strip("/").replace("/", ".")
        y = g.op("MatMul", [x, g.init(f"{key}.MatMul.weight_T", self.act(w.T))], f"{name}/MatMul")[0]
        if bias is not None:
            y = g.op("Add", [y, g.init(f"{key}.MatMul.bias", self.act(bias))], f"{name}/Add")[0]
        return y

    def _split(self, y: str, sizes: list[int], name: str) -> list[str]:
        return self.g.op("Split", [y, self.g.const_i64(sizes)], f"{name}/Split", n_out=len(sizes), axis=-1)

    def _head(self, h: str) -> None:
        g = self.g
        if "lm_head" in self.r.quantized:
            raise FormatError("onnx keeps the LM head unquantized; quantize with --keep-head-fp")
        head = self.fp("lm_head.weight")
        emb = self.fp("model.embed_tokens.weight")
        tied = self.r.tied and (head is None or np.array_equal(head, emb))
        w = "model.embed_tokens.weight" if tied else g.init("lm_head.weight", self.act(head))
        flat = g.op("Reshape", [h, g.const_i64([-1, self.hidden])], "/lm_head/Reshape_2d")[0]
        y = g.op("Gemm", [flat, w], "/lm_head/Gemm", transB=1)[0]
        bs = g.op("Shape", ["input_ids"], "/lm_head/Shape")[0]
        shape = g.op("Concat", [bs, g.const_i64([self.vocab])], "/lm_head/Concat", axis=0)[0]
        if self.g.np_dtype == np.float32:
            g.op("Reshape", [y, shape], "/lm_head/Reshape_3d", outputs=["logits"])
        else:
            y3 = g.op("Reshape", [y, shape], "/lm_head/Reshape_3d")[0]
            g.op("Cast", [y3], "/lm_head/Cast", outputs=["logits"], to=TensorProto.FLOAT)

    # -- the model proto ----------------------------------------------------------------------
    def _model(self) -> onnx.ModelProto:
        dt = self.g.onnx_dtype
        kv = ["batch_size", self.n_kv, "past_sequence_length", self.head_dim]
        kv_out = ["batch_size", self.n_kv, "total_sequence_length", self.head_dim]
        vi = helper.make_tensor_value_info
        inputs = [vi("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  vi("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
        outputs = [vi("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", self.vocab])]
        for i in range(self.n_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", dt, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", dt, kv_out))
        graph = helper.make_graph(self.g.nodes, "lfq_export_decoder", inputs, outputs, initializer=self.g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", MS_OPSET)],
                                  producer_name="lfq-export")
        model.ir_version = IR_VERSION
        meta = {LINEARS_METADATA_KEY: json.dumps(self.linears), "lfq_export.family": self.r.family,
                "lfq_export.scheme": self.r.scheme, "lfq_export.dtype": self.o.dtype,
                "lfq_export.accuracy_level": str(self.o.accuracy_level)}
        helper.set_model_props(model, meta)
        return model


# ---- architecture facts taken from HF's own code ---------------------------------------------------
def rope_cos_sin(config: dict[str, Any], family: str) -> tuple[np.ndarray, np.ndarray]:
    """`cos`, `sin` `[max_positions, head_dim]` (float32) from the family's HF rotary module, for
    positions 0..max_position_embeddings−1: the same values HF multiplies q and k by."""
    from transformers import AutoConfig

    cfg = dict(config)
    cfg.pop("quantization_config", None)
    hf_cfg = AutoConfig.for_model(**cfg)
    mod = importlib.import_module(f"transformers.models.{hf_cfg.model_type}.modeling_{hf_cfg.model_type}")
    cls = next(getattr(mod, a) for a in dir(mod) if a.endswith("RotaryEmbedding") and not a.startswith("_"))
    rotary = cls(config=hf_cfg)
    n = int(cfg["max_position_embeddings"])
    pos = torch.arange(n, dtype=torch.int64)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    return cos[0].numpy(), sin[0].numpy()


def sliding_window(config: dict[str, Any], family: str, layer: int) -> int | None:
    """The config's sliding window at layer `layer`, or None for full causal attention.

    GroupQueryAttention's `local_window_size` takes the same number as HF's `sliding_window`
    (checked against HF on a mistral with window 8 over 30 tokens: window − 1 is off by one)."""
    window = config.get("sliding_window")
    if window is None:
        return None
    if family == "mistral":
        return int(window)
    types = config.get("layer_types")
    if types is not None:
        return int(window) if types[layer] == "sliding_attention" else None
    return None
