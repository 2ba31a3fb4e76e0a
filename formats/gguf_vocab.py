"""Tokenizer metadata for GGUF, so that llama.cpp tokenizes exactly like the run's HF tokenizer.

Two vocab kinds cover the supported families:

- SentencePiece (`tokenizer.ggml.model = llama`): pieces, scores and types from `tokenizer.model`
  (gguf-py's `SentencePieceVocab`), or from an SPM-style `tokenizer.json` (`LlamaHfVocab`);
  `add_space_prefix` from the model's `add_dummy_prefix`.
- Byte-level BPE (`gpt2`): the HF vocabulary as is, merges from `tokenizer.json`/`merges.txt`, and the
  pre-tokenizer name `tokenizer.ggml.pre` (see `detect_pre_tokenizer`).

The HF tokenizer object is the reference for everything it decides at run time: special-token ids,
whether BOS/EOS are added (measured by encoding a text, not read from a flag that may be stale),
added tokens and the chat template. Vocabularies shorter than the embedding are padded with
`[PAD<i>]` UNUSED tokens (llama.cpp requires one token per embedding row).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from lfq_export.errors import FormatError

log = logging.getLogger(__name__)

__all__ = ["VocabMetadata", "vocab_metadata", "write_vocab", "detect_pre_tokenizer", "PRE_TOKENIZERS", "load_hf_tokenizer"]

#: A probe text for pre-tokenizer detection: digits of every length, contractions in both cases,
#: whitespace runs and newlines, punctuation runs, non-Latin scripts and emoji.
PROBE_TEXT = (
    "\n \n\n \t\t \t\n   \n    x  \n\t y\r\nz \u00a0 end.\n"
    "1 12 123 1234 12345 3.14 1,000,000 0x1F 2024-11-22 v1.2.3 #42 $9.99 50% "
    "I'm you're it's we've they'll she'd DON'T I'M YOU'RE We'Ve a'lL it'S "
    "(parenthesised) [bracketed] {braced} \"quoted\" 'single' ``` ''' ---=== ...!!!??? ;:;: "
    "naïve café Ünïcödé ß Привет мир Ελληνικά 日本語のテキスト 中文测试 한국어 العربية हिन्दी "
    "🚀 😶\u200d🌫️ ✅ 🦙🦙 ~~~ def f(x):\n    return x**2  # comment\n\tif a==b: pass"
)

_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp BPE pre-tokenizer: its GGUF name, HF equivalent and detokenizer cleanup.

    `clean_spaces` is what llama.cpp sets for that name (src/llama-vocab.cpp): it must agree with
    the HF tokenizer's `clean_up_tokenization_spaces` or decoded text differs."""

    name: str
    clean_spaces: bool

    def hf(self) -> Any:
        from tokenizers import Regex
        from tokenizers import pre_tokenizers as pt

        bytelevel = pt.ByteLevel(add_prefix_space=False, use_regex=False)
        if self.name == "llama-bpe":
            return pt.Sequence([pt.Split(Regex(_LLAMA3_RE), behavior="isolated"), bytelevel])
        if self.name == "qwen2":
            return pt.Sequence([pt.Split(Regex(_QWEN2_RE), behavior="isolated"), bytelevel])
        if self.name == "smollm":
            return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)  # gpt-2


#: candidates in order of preference when several reproduce the tokenizer
PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    PreTokenizer("llama-bpe", clean_spaces=True),
    PreTokenizer("smollm", clean_spaces=False),
    PreTokenizer("qwen2", clean_spaces=False),
    PreTokenizer("gpt-2", clean_spaces=True),
)


#: special tokens written as `tokenizer.ggml.<kind>_token_id` (the ones gguf-py's writer has a key for)
_SPECIAL_KINDS = ("bos", "eos", "unk", "pad", "sep", "mask")


@dataclass
class VocabMetadata:
    """Everything written under `tokenizer.*`."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: Any = None


def load_hf_tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:  # noqa: BLE001 - any loader failure is the same user problem
        raise FormatError(f"{tokenizer_dir}: cannot load the run's tokenizer ({e})") from None


def vocab_metadata(tokenizer_dir: Path | None, vocab_size: int, config: dict[str, Any],
                   pre_override: str | None = None) -> VocabMetadata:
    """Tokenizer metadata for a run's tokenizer directory, padded to the model's `vocab_size`."""
    if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
        raise FormatError("the run has no tokenizer files; GGUF needs the tokenizer (re-run quantize from a model "
                          "directory that has one)")
    d = Path(tokenizer_dir)
    tok = load_hf_tokenizer(d)
    if (d / "tokenizer.model").is_file():
        meta = _sentencepiece(d, tok, vocab_size)
    else:
        kind = _tokenizer_json_kind(d)
        if kind == "spm":
            meta = _llama_hf(d, tok, vocab_size)
        elif kind == "bpe":
            meta = _byte_level_bpe(d, tok, vocab_size, pre_override)
        else:
            raise FormatError(f"{d}: tokenizer kind {kind!r} is not supported for GGUF (supported: SentencePiece "
                              "tokenizer.model, SPM-style or byte-level BPE tokenizer.json)")
    _special(meta, d, tok, config)
    _check_lengths(meta)
    return meta


def _tokenizer_json_kind(d: Path) -> str:

    f = d / "tokenizer.json"
    if not f.is_file():
        return "missing tokenizer.json/tokenizer.model"
    tj = json.loads(f.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        return str(model.get("type"))
    if model.get("byte_fallback"):
        return "spm"
    return "bpe"


# ---- SentencePiece -------------------------------------------------------------------------------
def _sentencepiece(d: Path, tok: Any, vocab_size: int) -> VocabMetadata:
    try:
        vocab = gguf.SentencePieceVocab(d)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise FormatError(f"{d}/tokenizer.model: {e}") from None
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(ttype))
    _mark_added(tok, tokens, types, scores, spm=True, vocab_size=vocab_size)
    meta = VocabMetadata("llama", "default", tokens, types, scores)
    meta.add_space_prefix = _spm_add_dummy_prefix(d / "tokenizer.model")
    _pad(meta, vocab_size)
    return meta


def _spm_add_dummy_prefix(path: Path) -> bool:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(path.read_bytes())
    return bool(m.normalizer_spec.add_dummy_prefix)


def _llama_hf(d: Path, tok: Any, vocab_size: int) -> VocabMetadata:
    vocab = gguf.LlamaHfVocab(d)
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(ttype))
    meta = VocabMetadata("llama", "default", tokens, types, scores)
    meta.add_space_prefix = _metaspace_prepends(d)
    _pad(meta, vocab_size)
    return meta


def _metaspace_prepends(d: Path) -> bool:

    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    parts = [tj.get("pre_tokenizer") or {}, tj.get("normalizer") or {}]
    flat = [p for x in parts for p in (x.get("pretokenizers") or x.get("normalizers") or [x])]
    for p in flat:
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always") != "never"
        if p.get("type") == "Prepend":
            return True
    return False


# ---- byte-level BPE ------------------------------------------------------------------------------
def _byte_level_bpe(d: Path, tok: Any, vocab_size: int, pre_override: str | None) -> VocabMetadata:
    reverse = {i: t for t, i in tok.get_vocab().items()}
    if reverse and max(reverse) >= vocab_size:
        raise FormatError(f"{d}: token id {max(reverse)} does not fit the model's vocab_size {vocab_size}")
    tokens = [reverse.get(i, f"[PAD{i}]").encode("utf-8") for i in range(vocab_size)]
    types = [int(gguf.TokenType.NORMAL if i in reverse else gguf.TokenType.UNUSED) for i in range(vocab_size)]
    _mark_added(tok, tokens, types, None, spm=False, vocab_size=vocab_size)
    special = gguf.SpecialVocab(d, load_merges=True)
    if not special.merges:
        raise FormatError(f"{d}: the BPE tokenizer has no merges; llama.cpp refuses a gpt2 vocab without them")
    pre = pre_override or detect_pre_tokenizer(tok)
    return VocabMetadata("gpt2", pre, tokens, types, None, merges=list(special.merges))


def detect_pre_tokenizer(tok: Any, probe: str = PROBE_TEXT) -> str:
    """The llama.cpp pre-tokenizer name that reproduces this HF tokenizer.

    A candidate must give the same token ids as the tokenizer on a probe text (its BPE model run
    behind the candidate's pre-tokenizer), and llama.cpp's detokenizer cleanup for that name must
    agree with the tokenizer's `clean_up_tokenization_spaces`. When several qualify (a vocabulary
    without cross-boundary merges hides the differences), the one whose definition is the
    tokenizer's own pre-tokenizer wins, else the first in `PRE_TOKENIZERS`."""
    from tokenizers import Tokenizer

    backend = tok.backend_tokenizer
    if backend.normalizer is not None:
        raise FormatError("the BPE tokenizer normalizes text before splitting; llama.cpp's BPE tokenizers do not, "
                          "so no GGUF pre-tokenizer reproduces it")
    want = backend.encode(probe, add_special_tokens=False).ids
    clean = bool(getattr(tok, "clean_up_tokenization_spaces", False))
    own = _signature(json.loads(backend.to_str()).get("pre_tokenizer"))
    tried, valid = [], []
    for cand in PRE_TOKENIZERS:
        trial = Tokenizer.from_str(backend.to_str())
        trial.pre_tokenizer = cand.hf()
        same_ids = trial.encode(probe, add_special_tokens=False).ids == want
        tried.append(f"{cand.name} (ids {'match' if same_ids else 'differ'}, clean_spaces {cand.clean_spaces})")
        if same_ids and cand.clean_spaces == clean:
            valid.append((cand.name, _signature(json.loads(trial.to_str()).get("pre_tokenizer"))))
    if not valid:
        raise FormatError("no llama.cpp pre-tokenizer reproduces this BPE tokenizer "
                          f"(clean_up_tokenization_spaces={clean}; tried {'; '.join(tried)}); "
                          "pass --gguf-tokenizer-pre NAME to force one (then check `lfq-export verify`)")
    return next((name for name, sig in valid if sig == own), valid[0][0])


def _signature(pre: dict[str, Any] | None) -> tuple[tuple[Any, ...], ...]:
    """What defines a pre-tokenizer's splits: component types, regexes and flags (not offsets options)."""
    if not pre:
        return ()
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    out = []
    for p in parts or []:
        pattern = p.get("pattern") or {}
        out.append((p.get("type"), pattern.get("Regex") or pattern.get("String"), p.get("use_regex"),
                    p.get("individual_digits"), p.get("behavior")))
    return tuple(out)


# ---- shared --------------------------------------------------------------------------------------
def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))


def _mark_added(tok: Any, tokens: list[bytes], types: list[int], scores: list[float] | None, spm: bool,
                vocab_size: int) -> None:
    """Added tokens → CONTROL (special) or USER_DEFINED; append those beyond the base vocabulary.

    Added tokens with ids beyond the embedding (the model can never emit them) are left out, as
    llama.cpp's converter does: the file must have exactly one token per embedding row."""
    for i, added in sorted(tok.added_tokens_decoder.items()):
        if i >= vocab_size:
            log.warning("added token %r has id %d beyond the model's vocab_size %d: left out of the GGUF vocabulary",
                        added.content, i, vocab_size)
            continue
        control = added.special or _looks_special(added.content)
        if i < len(tokens):
            if spm and types[i] in (int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.BYTE)):
                continue  # SentencePiece already typed it
            tokens[i] = added.content.encode("utf-8")
        else:
            if i != len(tokens):
                raise FormatError(f"added token {added.content!r} has id {i}, but the vocabulary has {len(tokens)} tokens")
            tokens.append(added.content.encode("utf-8"))
            types.append(0)
            if scores is not None:
                scores.append(-1000.0)
        types[i] = int(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        if scores is not None:
            scores[i] = -1000.0


def _pad(meta: VocabMetadata, vocab_size: int) -> None:
    if len(meta.tokens) > vocab_size:
        raise FormatError(f"the tokenizer has {len(meta.tokens)} tokens, more than the model's vocab_size {vocab_size}")
    for i in range(len(meta.tokens), vocab_size):
        meta.tokens.append(f"[PAD{i}]".encode())
        meta.types.append(int(gguf.TokenType.UNUSED))
        if meta.scores is not None:
            meta.scores.append(-1000.0)


def _special(meta: VocabMetadata, d: Path, tok: Any, config: dict[str, Any]) -> None:
    """Special ids, BOS/EOS insertion (measured) and the chat template."""
    for kind in _SPECIAL_KINDS:
        tid = getattr(tok, f"{kind}_token_id", None)
        if tid is None and kind in ("bos", "eos") and isinstance(config.get(f"{kind}_token_id"), int):
            tid = config[f"{kind}_token_id"]
        if isinstance(tid, int) and 0 <= tid < len(meta.tokens):
            meta.special_ids[kind] = tid
    with_sp = tok.encode("a", add_special_tokens=True)
    without = tok.encode("a", add_special_tokens=False)
    bos, eos = meta.special_ids.get("bos"), meta.special_ids.get("eos")
    meta.add_bos = bos is not None and len(with_sp) > len(without) and with_sp[0] == bos and with_sp[1:1 + len(without)] == without
    meta.add_eos = eos is not None and len(with_sp) > len(without) and with_sp[-1] == eos and with_sp[-1 - len(without):-1] == without
    if len(with_sp) - len(without) != int(meta.add_bos) + int(meta.add_eos):
        raise FormatError(f"{d}: the tokenizer adds special tokens other than BOS/EOS ({with_sp} vs {without}); "
                          "llama.cpp cannot reproduce that")
    meta.chat_template = getattr(tok, "chat_template", None)  # transformers reads chat_template.jinja/.json too


#: longest strings written from the input's tokenizer: a chat template (real ones are ~10–100 KB) and
#: one vocabulary entry or merge rule; longer ones mean a damaged or hostile tokenizer, and llama.cpp
#: would load them blindly
MAX_TEMPLATE_BYTES = 1 << 20
MAX_TOKEN_BYTES = 1 << 12


def _check_lengths(meta: VocabMetadata) -> None:
    if meta.chat_template and len(str(meta.chat_template).encode()) > MAX_TEMPLATE_BYTES:
        raise FormatError(f"the tokenizer's chat template has {len(str(meta.chat_template).encode())} bytes "
                          f"(limit {MAX_TEMPLATE_BYTES}); fix tokenizer_config.json")
    for what, items in (("token", meta.tokens), ("merge rule", meta.merges or [])):
        for i, t in enumerate(items):
            n = len(t) if isinstance(t, bytes) else len(str(t).encode())
            if n > MAX_TOKEN_BYTES:
                raise FormatError(f"{what} {i} of the tokenizer has {n} bytes (limit {MAX_TOKEN_BYTES}); "
                                  "the tokenizer is damaged")


def write_vocab(writer: gguf.GGUFWriter, meta: VocabMetadata) -> None:
    """Add every `tokenizer.*` key of `meta` to the writer."""
    writer.add_tokenizer_model(meta.model)
    writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.types)
    if meta.scores is not None:
        writer.add_token_scores(meta.scores)
    if meta.merges:
        writer.add_token_merges(meta.merges)
    for kind, tid in meta.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(tid)
    writer.add_add_bos_token(meta.add_bos)
    writer.add_add_eos_token(meta.add_eos)
    if meta.add_space_prefix is not None:
        writer.add_add_space_prefix(meta.add_space_prefix)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)
