"""Our GGUF tokenizers against transformers' GGUF tokenizers, with llama.cpp as a second reference,
and the HF-folder path against `PreTrainedTokenizerFast`."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from tokenizer_refs import CORPUS, GGUF_ALIASES, gguf_path, llama_cpp_model, ours, quiet, transformers_tokenizer

from levante.errors import ModelLoadError
from levante.loader.gguf_metadata import read_gguf_metadata
from levante.loader.tokenizer import Tokenizer

EXPECTED = {  # alias: (bos, eos, end-of-generation ids)
    "qwen2.5-coder:0.5b": ("<|endoftext|>", "<|im_end|>", {151643, 151645}),
    "smollm2:135m": ("<|im_start|>", "<|im_end|>", {0, 2}),
    "gemma3:270m": ("<bos>", "<eos>", {1, 106}),
}


@pytest.mark.parametrize("alias", GGUF_ALIASES)
def test_encode_decode_match_transformers(alias):
    tokenizer, reference = ours(alias), transformers_tokenizer(alias)
    for text in CORPUS:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("alias", GGUF_ALIASES)
def test_encode_matches_llama_cpp(alias):
    tokenizer, reference = ours(alias), llama_cpp_model(alias)
    for text in CORPUS:
        assert tokenizer.encode(text) == reference.tokenize(text.encode(), add_bos=True, special=True), text


@pytest.mark.parametrize("alias", GGUF_ALIASES)
def test_special_tokens_and_vocab(alias):
    tokenizer, reference = ours(alias), transformers_tokenizer(alias)
    bos, eos, eos_ids = EXPECTED[alias]
    assert (tokenizer.bos_token, tokenizer.eos_token) == (bos, eos)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    assert tokenizer.eos_token_ids == eos_ids
    assert tokenizer.vocab_size == len(reference)
    assert set(reference.all_special_ids) <= set(tokenizer.all_special_ids)
    for token_id in (0, 1, 100, 1000, tokenizer.vocab_size - 1):
        token = tokenizer.id_to_token(token_id)
        assert token == reference.convert_ids_to_tokens(token_id)
        assert tokenizer.token_to_id(token) == token_id or token.startswith("[PAD")


def test_chat_template_from_metadata():
    assert "<|im_start|>" in ours("qwen2.5-coder:0.5b").chat_template
    assert ours("gemma3:270m").chat_template is None  # the base model ships none


@pytest.mark.parametrize("alias", GGUF_ALIASES)
def test_from_folder_matches_fast_tokenizer(alias, tmp_path):
    quiet()
    from transformers import PreTrainedTokenizerFast

    transformers_tokenizer(alias).save_pretrained(tmp_path)
    tokenizer = Tokenizer.from_folder(tmp_path)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in CORPUS:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text) == ours(alias).encode(text), text
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert (tokenizer.bos_token, tokenizer.eos_token) == EXPECTED[alias][:2]
    assert tokenizer.eos_token_ids == EXPECTED[alias][2]
    assert tokenizer.chat_template == ours(alias).chat_template


def test_from_folder_reads_generation_config_and_named_templates(tmp_path):
    transformers_tokenizer("smollm2:135m").save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    config = (tmp_path / "tokenizer_config.json").read_text()
    (tmp_path / "tokenizer_config.json").write_text(
        config.rstrip()[:-1] + ', "chat_template": [{"name": "tool_use", "template": "T"}, '
        '{"name": "default", "template": "D"}]}')
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    tokenizer = Tokenizer.from_folder(tmp_path)
    assert tokenizer.chat_template == "D"
    assert tokenizer.eos_token_ids == {0, 2, 7}


def test_metadata_reader_agrees_with_gguf_reader():
    path = gguf_path("smollm2:135m")
    reader = gguf.GGUFReader(path)
    assert read_gguf_metadata(path) == read_gguf_metadata(reader)
    assert Tokenizer.from_gguf_metadata(reader).encode(CORPUS[4]) == ours("smollm2:135m").encode(CORPUS[4])


def test_missing_or_corrupt_files(tmp_path):
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        Tokenizer.from_gguf_metadata(tmp_path / "broken.gguf")
    (tmp_path / "truncated.gguf").write_bytes(gguf_path("smollm2:135m").read_bytes()[:300_000])
    with pytest.raises(ModelLoadError, match="truncated"):
        Tokenizer.from_gguf_metadata(tmp_path / "truncated.gguf")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        Tokenizer.from_gguf_metadata(tmp_path / "missing.gguf")


# -- a generic SentencePiece (`llama`) vocabulary: no packaged model has one, so we write a tiny GGUF --

PIECES = ["▁", "e", "h", "l", "o", "w", "r", "d", "t", "s", "i", "n", "é", "你", "▁h", "he", "el", "ll", "lo",
          "hel", "hell", "hello", "▁hello", "▁w", "or", "wor", "world", "▁world", "▁t", "th", "the", "▁the",
          "is", "▁is", "▁▁", "▁▁▁▁"]
SPM_TEXTS = ["hello world", "the world is hello", "hello  world\n\nthe", "xyz é你 <tool> done", "hé 你好 ok", "a"]


def write_tiny_sentencepiece_gguf(path, add_space_prefix=None):
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *PIECES, "<tool>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(PIECES), 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(PIECES))] + [0.0]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_generic_sentencepiece_matches_transformers_and_llama_cpp(tmp_path):
    quiet()
    from transformers import AutoTokenizer

    write_tiny_sentencepiece_gguf(tmp_path / "tiny.gguf")
    tokenizer = Tokenizer.from_gguf_metadata(tmp_path / "tiny.gguf")
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    lcpp = pytest.importorskip("llama_cpp").Llama(str(tmp_path / "tiny.gguf"), vocab_only=True, verbose=False)
    for text in SPM_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        if "<tool>" not in text:  # llama.cpp prefixes a space after an added token; HF does not
            assert ids == lcpp.tokenize(text.encode(), add_bos=True, special=True), text
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert tokenizer.encode("hello")[0] == tokenizer.bos_token_id == 1


def test_add_space_prefix_false_follows_llama_cpp(tmp_path):
    """transformers ignores `tokenizer.ggml.add_space_prefix` (it always prepends "▁");
    llama.cpp honours it, and so do we."""
    quiet()
    from transformers import AutoTokenizer

    write_tiny_sentencepiece_gguf(tmp_path / "tiny.gguf", add_space_prefix=False)
    tokenizer = Tokenizer.from_gguf_metadata(tmp_path / "tiny.gguf")
    lcpp = pytest.importorskip("llama_cpp").Llama(str(tmp_path / "tiny.gguf"), vocab_only=True, verbose=False)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    ids = tokenizer.encode("hello world")
    assert ids == lcpp.tokenize(b"hello world", add_bos=True, special=True)
    assert tokenizer.id_to_token(ids[1]) == "hello"
    assert reference.convert_ids_to_tokens(reference.encode("hello world")[1]) == "▁h"  # transformers' divergence
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
