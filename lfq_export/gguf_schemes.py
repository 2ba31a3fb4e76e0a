"""`gguf:*` schemes: one GGUF grid per tensor, chosen the way llama.cpp's `llama-quantize` chooses types.

Naming (one rule, so a name never means two things):

- `gguf:<mix>` with a `llama-quantize` file-type name — `q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k_s q3_k_m
  q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k` — selects every tensor's type exactly as `llama-quantize
  <FTYPE>` does without `--pure` and without an imatrix (src/llama-quant.cpp, `llama_tensor_get_type`):
  the per-tensor mix rules, the output/tied-embedding rule and the shape fallbacks.
- `gguf:<type>` for the bare K-quant types `q3_k q4_k q5_k` (which are not llama-quantize file types)
  and `gguf:<type>-pure` for every type: `--pure`-like, every block linear is that one type (shape
  fallbacks still apply, as in `llama-quantize --pure`); the embedding/head follow llama-quantize's
  output rule. `q2_k` is llama-quantize's Q2_K *mix*; the all-Q2_K scheme is `gguf:q2_k-pure`.
  For the legacy types, q6_k and q8_0 the mix and the pure scheme are the same selection.

Head and embedding (unless `--keep-head-fp`): `lm_head` — or, for tied models, the embedding, which
llama.cpp then also uses as the output (no `output` tensor) — gets Q6_K (Q8_0 for the `q8_0` scheme,
or when its row length is not a multiple of the default type's block); an untied embedding gets the
default type. Fallbacks when a row length is not a multiple of 256: Q2_K/Q3_K→Q4_0, Q4_K→Q5_0,
Q5_K→Q5_1, Q6_K→Q8_0. A row that is not even a multiple of 32 has no GGUF block type: llama-quantize
writes F16 there; here the plan refuses it (naming `--skip-unquantizable`, which keeps it FP).

This module only decides types (`select_types`, pure and table-testable); `resolve` turns them into
the grids of `lfq_export.grids.gguf_legacy` / `gguf_kquants`.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import SchemeError
from .grids import Grid, grid_from_dict
from .schemes import SchemeContext, SchemeFamily, register_scheme_family

__all__ = [
    "GGUF_TYPES",
    "BLOCK_SIZE",
    "MIXES",
    "PURE_TYPES",
    "TypeSelection",
    "select_types",
    "gguf_grid",
    "gguf_scheme_names",
    "llama_ftype_name",
    "use_more_bits",
    "fallback_type",
    "scheme_types",
]

PREFIX = "gguf:"
PURE_SUFFIX = "-pure"

#: ggml types a scheme may choose, with their block size along the row (GGML_QUANT_SIZES)
BLOCK_SIZE: dict[str, int] = {
    "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32,
    "q2_k": 256, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256,
}
GGUF_TYPES: tuple[str, ...] = tuple(BLOCK_SIZE)

#: `tensor_type_fallback`: the 32-block type used when a row is not a multiple of 256
_FALLBACK: dict[str, str] = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}

#: bare type names that are pure schemes (llama-quantize has no file type of that name)
PURE_TYPES: tuple[str, ...] = ("q3_k", "q4_k", "q5_k")

# HF block-linear suffix → llama-quantize tensor category
_CATEGORY = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def use_more_bits(i: int, n: int) -> bool:
    """llama-quantize's layer pattern for extra bits: the first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class Layer:
    """What the mix rules look at for one block (`i` counts the tensors of that category, = block index)."""

    i: int
    n: int
    n_gqa: int
    is_70b: bool


Rule = Callable[[Layer], "str | None"]  # a type, or None for "keep the default"


@dataclass(frozen=True)
class Mix:
    """One llama-quantize file type: its default type and its per-category overrides."""

    default: str
    ftype: str  # llama.h LLAMA_FTYPE_MOSTLY_<ftype>
    attn_v: Rule = lambda L: None
    ffn_down: Rule = lambda L: None
    attn_output: Rule = lambda L: None


MIXES: dict[str, Mix] = {
    "q4_0": Mix("q4_0", "Q4_0"),
    "q4_1": Mix("q4_1", "Q4_1"),
    "q5_0": Mix("q5_0", "Q5_0"),
    "q5_1": Mix("q5_1", "Q5_1"),
    "q8_0": Mix("q8_0", "Q8_0"),
    "q2_k": Mix("q2_k", "Q2_K",
                attn_v=lambda L: "q4_k" if L.n_gqa >= 4 else "q3_k",
                ffn_down=lambda L: "q3_k",
                attn_output=lambda L: "q3_k"),
    "q3_k_s": Mix("q3_k", "Q3_K_S"),
    "q3_k_m": Mix("q3_k", "Q3_K_M",
                  attn_v=lambda L: "q5_k" if L.i < 2 else "q4_k",
                  ffn_down=lambda L: "q5_k" if L.i < L.n // 16 else "q4_k",
                  attn_output=lambda L: "q4_k"),
    "q3_k_l": Mix("q3_k", "Q3_K_L",
                  attn_v=lambda L: "q5_k", ffn_down=lambda L: "q5_k", attn_output=lambda L: "q5_k"),
    "q4_k_s": Mix("q4_k", "Q4_K_S",
                  attn_v=lambda L: "q5_k" if L.i < 4 else None,
                  ffn_down=lambda L: "q5_k" if L.i < L.n // 8 else None),
    "q4_k_m": Mix("q4_k", "Q4_K_M",
                  attn_v=lambda L: "q6_k" if use_more_bits(L.i, L.n) else None,
                  ffn_down=lambda L: "q6_k" if use_more_bits(L.i, L.n) else None),
    "q5_k_s": Mix("q5_k", "Q5_K_S"),
    "q5_k_m": Mix("q5_k", "Q5_K_M",
                  attn_v=lambda L: "q6_k" if use_more_bits(L.i, L.n) else None,
                  ffn_down=lambda L: "q6_k" if use_more_bits(L.i, L.n) else None),
    "q6_k": Mix("q6_k", "Q6_K"),
}

#: llama.h file type that best describes a pure scheme (pure q3_k/q5_k *are* Q3_K_S/Q5_K_S)
_PURE_FTYPE = {"q2_k": "Q2_K", "q3_k": "Q3_K_S", "q4_k": "Q4_K_S", "q5_k": "Q5_K_S", "q6_k": "Q6_K",
               "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0"}


def gguf_scheme_names() -> list[str]:
    """Every scheme name of this family (listed in `lfq-export schemes`)."""
    mixes = [PREFIX + m for m in MIXES]
    pure = [PREFIX + t for t in PURE_TYPES] + [PREFIX + "q2_k" + PURE_SUFFIX]
    return mixes + pure


def _parse(scheme: str) -> tuple[str, bool]:
    """`gguf:NAME` → (type or mix name, pure?); refuses unknown names listing the known ones."""
    body = scheme[len(PREFIX):] if scheme.startswith(PREFIX) else scheme
    if body.endswith(PURE_SUFFIX) and body[: -len(PURE_SUFFIX)] in BLOCK_SIZE:
        return body[: -len(PURE_SUFFIX)], True
    if body in PURE_TYPES:
        return body, True
    if body in MIXES:
        return body, False
    raise SchemeError(f"unknown GGUF scheme {scheme!r}; known: {', '.join(gguf_scheme_names())} "
                      f"(and gguf:<type>-pure for {', '.join(GGUF_TYPES)})")


def llama_ftype_name(scheme: str) -> str:
    """The llama.h file type (`general.file_type`) that a scheme corresponds to, e.g. `Q4_K_M`."""
    name, pure = _parse(scheme)
    return _PURE_FTYPE[name] if pure else MIXES[name].ftype


def fallback_type(t: str, in_features: int) -> str | None:
    """The type llama-quantize writes for a row of `in_features` instead of `t`; None = no GGUF block fits (F16)."""
    if in_features % BLOCK_SIZE[t] == 0:
        return t
    fb = _FALLBACK.get(t, t)
    return fb if in_features % BLOCK_SIZE[fb] == 0 else None


@dataclass
class TypeSelection:
    """Per-tensor ggml types (HF module name → type name) and the remarks for the report."""

    types: dict[str, str] = field(default_factory=dict)
    wanted: dict[str, str] = field(default_factory=dict)  # before the shape fallback
    notes: list[str] = field(default_factory=list)


def _is_70b(ctx: SchemeContext) -> bool:
    """llama.cpp's LLM_TYPE_70B (only that size changes the mix): 80 layers, GQA for llama; 80 layers for qwen2."""
    cfg = ctx.config
    arch = ctx.adapter.gguf_arch
    if arch == "llama":
        return ctx.n_layers == 80 and cfg.num_attention_heads != cfg.num_key_value_heads
    return arch == "qwen2" and ctx.n_layers == 80


def _block_type(mix: Mix, pure: bool, category: str, layer: Layer) -> str:
    """llama_tensor_get_type_impl for one block linear (before the shape fallback)."""
    t = mix.default
    if pure:
        return t
    rule = {"attn_v": mix.attn_v, "ffn_down": mix.ffn_down, "attn_output": mix.attn_output}.get(category)
    if rule is not None:
        t = rule(layer) or t
    if category == "attn_v" and layer.is_70b and t in ("q3_k", "q4_k"):
        t = "q5_k"  # 70B: attn_v is 8× smaller than attn_q, more bits are nearly free
    return t


def _output_type(default: str, in_features: int) -> str:
    """The output (or tied embedding) rule: Q6_K, or Q8_0 for the q8_0 scheme or a row the default type can't tile."""
    if in_features % BLOCK_SIZE[default] != 0 or default == "q8_0":
        return "q8_0"
    return "q6_k"


def select_types(scheme: str, ctx: SchemeContext) -> TypeSelection:
    """The ggml type of every tensor the scheme quantizes (block linears, and head/embedding unless kept FP)."""
    name, pure = _parse(scheme)
    mix = MIXES[name] if not pure else Mix(name, _PURE_FTYPE[name])
    cfg = ctx.config
    n_gqa = int(cfg.num_attention_heads) // max(1, int(getattr(cfg, "num_key_value_heads", 0) or cfg.num_attention_heads))
    is_70b = _is_70b(ctx)
    sel = TypeSelection()
    for mod in ctx.block_linears():
        i = int(ctx.adapter.block_index(mod + ".weight"))
        category = _CATEGORY[mod[len(ctx.adapter.block_prefix(i)):]]
        sel.wanted[mod] = _block_type(mix, pure, category, Layer(i, ctx.n_layers, n_gqa, is_70b))
    if not ctx.keep_head_fp:
        a = ctx.adapter
        out_mod = a.embedding if ctx.tied else a.lm_head
        sel.wanted[out_mod] = _output_type(mix.default, ctx.shapes[out_mod][1])
        if not ctx.tied:
            sel.wanted[a.embedding] = mix.default
    _apply_fallbacks(sel, ctx)
    return sel


def _apply_fallbacks(sel: TypeSelection, ctx: SchemeContext) -> None:
    """Shape fallbacks (`tensor_type_fallback`), summarised in the notes."""
    taken: Counter[tuple[str, str, int]] = Counter()
    for mod, t in sel.wanted.items():
        in_f = ctx.shapes[mod][1]
        fb = fallback_type(t, in_f)
        if fb is None:
            # no block fits: keep the 32-block type so the plan refuses it (or --skip-unquantizable keeps FP)
            sel.types[mod] = _FALLBACK.get(t, t)
            sel.notes.append(f"{mod}: row length {in_f} is not a multiple of 32, no GGUF block type fits "
                             "(llama-quantize would write F16); needs --skip-unquantizable to keep it FP")
            continue
        sel.types[mod] = fb
        if fb != t:
            taken[(t, fb, in_f)] += 1
    for (t, fb, in_f), n in sorted(taken.items()):
        sel.notes.append(f"fallback {t}→{fb} for {n} tensor(s): row length {in_f} is not a multiple of "
                         f"{BLOCK_SIZE[t]} (as llama-quantize)")
    counts = Counter(sel.types.values())
    sel.notes.append("types: " + ", ".join(f"{t}×{n}" for t, n in sorted(counts.items())))


# ---- grids -------------------------------------------------------------------------------------
_GRID_MODULES = ("lfq_export.grids.gguf_legacy", "lfq_export.grids.gguf_kquants")


def gguf_grid(t: str) -> Grid:
    """The grid of ggml type `t` (e.g. `q4_k` → kind `gguf:q4_k`)."""
    if t not in BLOCK_SIZE:
        raise SchemeError(f"unknown GGUF type {t!r}; known: {', '.join(GGUF_TYPES)}")
    for mod in _GRID_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return grid_from_dict({"kind": PREFIX + t})


def _resolve(scheme: str, ctx: SchemeContext) -> tuple[dict[str, Grid], list[str]]:
    sel = select_types(scheme, ctx)
    grids = {t: gguf_grid(t) for t in set(sel.types.values())}
    return {mod: grids[t] for mod, t in sel.types.items()}, sel.notes


def scheme_types(scheme: str) -> list[str]:
    """Every type a scheme may use on some model (mix rules, head rule and fallbacks)."""
    name, pure = _parse(scheme)
    mix = MIXES[name] if not pure else Mix(name, _PURE_FTYPE[name])
    types = {mix.default, _output_type(mix.default, 256), _output_type(mix.default, 32)}
    if not pure:
        for rule in (mix.attn_v, mix.ffn_down, mix.attn_output):
            for i in range(0, 80):
                for gqa in (1, 8):
                    t = rule(Layer(i, 80, gqa, False))
                    if t:
                        types.add(t)
        if "q3_k" in types or "q4_k" in types:
            types.add("q5_k")  # the 70B attn_v rule
    types |= {_FALLBACK[t] for t in list(types) if t in _FALLBACK}
    return sorted(types)


register_scheme_family(SchemeFamily(
    matches=lambda s: s.startswith(PREFIX),
    resolve=_resolve,
    names=gguf_scheme_names,
    grids_of=lambda s: [gguf_grid(t) for t in scheme_types(s)],
    quantizes_head=lambda s: True,
))
