"""Tokenizer metadata: SentencePiece (stories260K) and byte-level BPE pre-tokenizer detection, and
llama.cpp's own tokenizer on the written vocabulary against the HF tokenizer."""

from __future__ import annotations

import gguf
import pytest

from formats.gguf_vocab import PRE_TOKENIZERS, detect_pre_tokenizer, vocab_metadata
from lfq_export.errors import FormatError

TT = gguf.TokenType


def test_sentencepiece_metadata(stories_dir):
    m = vocab_metadata(stories_dir, 520, {})
    assert (m.model, m.pre, m.add_bos, m.add_eos, m.add_space_prefix) == ("llama", "default", True, False, True)
    assert m.tokens[:3] == [b"<unk>", b"<s>", b"</s>"] and m.tokens[3] == b"<0x00>"
    assert m.types[:4] == [TT.UNKNOWN, TT.CONTROL, TT.CONTROL, TT.BYTE]
    assert m.special_ids == {"bos": 1, "eos": 2, "unk": 0}
    assert len(m.tokens) == len(m.types) == len(m.scores) == 520  # padded to the embedding
    assert m.tokens[519] == b"[PAD519]" and m.types[519] == TT.UNUSED
    with pytest.raises(FormatError, match="more than the model's vocab_size"):
        vocab_metadata(stories_dir, 500, {})


CORPUS = [
    "The year 1984 had 365 days; it's 3.14159 times more fun. I'M sure you'RE right, we'Ve seen 12345 cats.",
    "Numbers like 100, 2000 and 33333 appear (often) in text: [1] {2} \"3\". Don't stop!",
    "  Whitespace\tand\nnewlines\n\n matter.  Émigré naïve café Über 日本語 Привет 🚀🦙 ",
] * 40


def _bpe(pre_tokenizer, clean: bool):
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = decoders.ByteLevel()
    from tokenizers.pre_tokenizers import ByteLevel

    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, initial_alphabet=ByteLevel.alphabet(),
                                                       special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=clean)


@pytest.mark.parametrize("name", [p.name for p in PRE_TOKENIZERS])
def test_pre_tokenizer_detected(name):
    cand = next(p for p in PRE_TOKENIZERS if p.name == name)
    tok = _bpe(cand.hf(), cand.clean_spaces)
    assert detect_pre_tokenizer(tok) == name


def test_unknown_pre_tokenizer_refused():
    from tokenizers import pre_tokenizers as pt

    tok = _bpe(pt.Sequence([pt.WhitespaceSplit(), pt.ByteLevel(add_prefix_space=False, use_regex=False)]), False)
    with pytest.raises(FormatError, match="no llama.cpp pre-tokenizer reproduces"):
        detect_pre_tokenizer(tok)


@pytest.mark.engine
def test_llama_cpp_tokenizes_like_hf_sentencepiece(stories_dir, tmp_path):
    import llama_cpp
    from transformers import AutoTokenizer

    from formats.gguf_engine import _spm_rule_ids
    from formats.gguf_write import write_gguf
    from tests.test_gguf_export import handmade_record

    path = write_gguf(handmade_record(stories_dir, ["q8_0"], head=("q8_0",)), tmp_path / "stories.gguf", {})
    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in ["Once upon a time, there was a little girl named Lily.", "Tom said: \"Wow!\" 12 cats ran 3 km.",
                     "Hello  world\nnew line", "naïve café ünïcode 日本", "<s>One.</s><s>Two.", "  indented text"]:
            hf, eng = tok.encode(text), llm.tokenize(text.encode(), add_bos=True, special=True)
            if text.startswith((" ", "<s>")):  # llama.cpp prefixes a space to every fragment; HF does not here
                assert hf != eng and eng == _spm_rule_ids(tok, text, True), text
                continue
            assert hf == eng, text
            assert llm.detokenize(eng).decode().strip() == tok.decode(hf, skip_special_tokens=True).strip()
    finally:
        llm.close()
