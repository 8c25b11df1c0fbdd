"""Shared by the tokenizer, detokenizer, chat template and GGUF loader tests: a text corpus, each
packaged GGUF tokenizer loaded once per pytest process (ours, transformers', llama.cpp's), and
transformers' model from a packaged GGUF file."""
from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from pathlib import Path

import pytest

from levante.errors import ModelLoadError
from levante.loader.sources import resolve_alias
from levante.loader.tokenizer import Tokenizer

GGUF_ALIASES = ["qwen2.5-coder:0.5b", "smollm2:135m", "gemma3:270m"]

CORPUS = [
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "The quick brown fox jumps over the lazy dog. I'm sure you'll see it's fine, don't worry.",
    "Élève français: «ça va?» — déjà vu, où est la bibliothèque? Œuvre, naïve, coïncidence.",
    "Grüße aus München! Straßenbahn, Fußgänger, Ärger, Öl, Übermaß.",
    "中文测试：你好，世界！今天天气很好。",
    "日本語のテキスト、カタカナとひらがな。東京タワー。",
    "한국어 텍스트입니다. 안녕하세요!",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "Привет, мир! Как дела? Ёжик в тумане.",
    "Emoji: 😀🎉🚀 👍🏽 ❤️ 🇫🇷🇯🇵",
    "ZWJ: 👨‍👩‍👧‍👦 🏳️‍🌈 👩🏽‍💻 🧑‍🤝‍🧑",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class A:\n\tdef f(self):\n\t\treturn {'a': [1, 2, 3]}\n\n\n# comment\n",
    '{"name": "levante", "version": "0.1.0", "tags": ["llm", "inference"], "nested": {"x": null, "y": true}}',
    "#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\" | tr a-z A-Z >> out.log; done\n",
    "    four spaces\n        eight spaces\n\t\ttwo tabs\n",
    "a  b   c    d     e      f\n\n\n\ng",
    "   \n \n\t \r\n  ",
    "1 12 123 1234 12345 123456 3.14159 -42 1e-10 0x1F 1,000,000 2024-01-31",
    "Numbers in text: I have 3 apples and 15 oranges, total 18.",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|endoftext|>",
    "<start_of_turn>user\nhello<end_of_turn>\n<bos><eos>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "Mixed: English, Français, 中文, 日本語, 한국어, عربي, हिन्दी, Русский, 🙂.",
    "Combining: e\u0301 n\u0303 a\u0308 (decomposed) vs é ñ ä",
    "URLs: https://example.com/path?q=1&r=2#frag and emails: a.b@c.de",
    "",
    "x",
    " ",
    "\n",
]


def quiet():
    """transformers warns on every GGUF load; keep test output readable."""
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def gguf_path(alias: str):
    try:
        return resolve_alias(alias)
    except ModelLoadError as error:
        pytest.skip(str(error))


@functools.cache
def ours(alias: str) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_path(alias))


@contextlib.contextmanager
def one_reader_per_file():
    """Within this block, each GGUF file gets one `gguf.GGUFReader`, however often it is opened.

    transformers opens the file with a new reader for the config and again for the tokenizer or
    the weights; building the reader parses every token string of the vocabulary (150k-260k of
    them) element by element in Python, 2-10 s of CPU each time. The reader only reads, so sharing
    it changes nothing in what transformers computes. The readers go with the block: they hold
    millions of small objects that the garbage collector would otherwise walk for the rest of
    the session."""
    import gguf

    real = gguf.GGUFReader
    readers = {}

    def shared(path, mode="r"):
        if mode != "r":
            return real(path, mode)
        key = str(Path(path).resolve())
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real


@functools.cache
def transformers_tokenizer(alias: str):
    quiet()
    from transformers import AutoTokenizer

    path = gguf_path(alias)
    with one_reader_per_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@functools.lru_cache(maxsize=1)
def transformers_model(alias: str):
    """transformers' float32 model dequantised from the packaged GGUF file: the reference of the
    GGUF loader (tests/test_gguf_loader.py) and of the default model's logits
    (tests/test_default_model.py). The last one built is kept, so that those two share the
    default model's, the slowest to build (transformers_model.cache_clear() frees it)."""
    quiet()
    import torch
    from transformers import AutoModelForCausalLM

    path = gguf_path(alias)
    with one_reader_per_file():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@functools.cache
def llama_cpp_model(alias: str):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(gguf_path(alias)), vocab_only=True, verbose=False)
