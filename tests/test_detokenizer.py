"""Streaming detokenization: the deltas add up to the full decode, never split a character, and
each step decodes a short window whatever the length of the sequence."""
from __future__ import annotations

import pytest
from tokenizer_refs import CORPUS, GGUF_ALIASES, ours

from levante.loader.tokenizer import IncrementalDetokenizer

# Rare characters: SentencePiece (Gemma) spells them with byte-fallback tokens, one byte each.
RARE = "𓀀𓀁 🫨🫠 ꙮ 𝔘𝔫𝔦 Ⱥ ௵ 你好"
TEXTS = CORPUS + [RARE, " ".join(CORPUS)]


def stream(tokenizer, prompt_ids, ids, skip_special_tokens=True, step_size=1):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    chunks = [detokenizer.step(ids[i:i + step_size]) for i in range(0, len(ids), step_size)]
    return chunks, detokenizer.flush()


def expected(tokenizer, prompt_ids, ids, skip):
    return tokenizer.decode(prompt_ids + ids, skip)[len(tokenizer.decode(prompt_ids, skip)):]


@pytest.mark.parametrize("alias", GGUF_ALIASES)
@pytest.mark.parametrize("skip", [True, False])
def test_deltas_add_up_to_the_full_decode(alias, skip):
    tokenizer = ours(alias)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        chunks, rest = stream(tokenizer, [], ids, skip)
        assert "".join(chunks) == tokenizer.decode(ids, skip), text
        assert rest == ""
        assert not any("\ufffd" in chunk for chunk in chunks), (text, chunks)


@pytest.mark.parametrize("alias", GGUF_ALIASES)
@pytest.mark.parametrize("step_size", [2, 5])
def test_after_a_prompt_and_in_multi_token_steps(alias, step_size):
    tokenizer = ours(alias)
    prompt = tokenizer.encode("System: réponds en français, s'il te plaît. 𓀀 User: ")
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        chunks, rest = stream(tokenizer, prompt, ids, step_size=step_size)
        assert "".join(chunks) + rest == expected(tokenizer, prompt, ids, True), text
        assert rest == ""
        assert not any("\ufffd" in chunk for chunk in chunks)


def test_holds_back_half_a_character():
    tokenizer = ours("gemma3:270m")
    ids = tokenizer.encode("🫨!", add_special_tokens=False)
    assert [tokenizer.id_to_token(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0xAB>", "<0xA8>", "!"]
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert [detokenizer.step([i]) for i in ids] == ["", "", "", "🫨", "!"]


def test_prompt_ending_inside_a_byte_run():
    """The context window must not start in the middle of a character's byte tokens."""
    tokenizer = ours("gemma3:270m")
    prompt = tokenizer.encode("𓀀𓀁", add_special_tokens=False)  # 8 byte tokens
    ids = tokenizer.encode("𓀂𓀃 ok", add_special_tokens=False)
    chunks, rest = stream(tokenizer, prompt, ids)
    assert "".join(chunks) == "𓀂𓀃 ok" and rest == ""


def test_sentencepiece_spacing_comes_from_context():
    tokenizer = ours("gemma3:270m")
    ids = tokenizer.encode("one two  three", add_special_tokens=False)
    chunks, _ = stream(tokenizer, tokenizer.encode("zero"), ids)
    assert "".join(chunks) == "one two  three"
    assert [tokenizer.id_to_token(i) for i in ids][1].startswith("▁")  # the space lives in the token
    assert chunks[1].startswith(" ")


def test_special_tokens_skipped_or_kept():
    tokenizer = ours("qwen2.5-coder:0.5b")
    ids = tokenizer.encode("<|im_start|>assistant\nHi!<|im_end|>")
    assert "".join(stream(tokenizer, [], ids, skip_special_tokens=True)[0]) == "assistant\nHi!"
    assert "".join(stream(tokenizer, [], ids, skip_special_tokens=False)[0]) == "<|im_start|>assistant\nHi!<|im_end|>"


def test_flush_returns_an_unfinished_character():
    tokenizer = ours("gemma3:270m")
    ids = tokenizer.encode("a🫨", add_special_tokens=False)[:-1]  # drop the emoji's last byte
    chunks, rest = stream(tokenizer, [], ids)
    assert "".join(chunks) == "a" and rest == "\ufffd" * 3
    assert "".join(chunks) + rest == tokenizer.decode(ids)


@pytest.mark.parametrize("alias", GGUF_ALIASES)
def test_each_step_decodes_a_short_window(alias):
    tokenizer = ours(alias)
    ids = tokenizer.encode(" ".join(CORPUS * 4), add_special_tokens=False)
    prompt = tokenizer.encode(" ".join(CORPUS))
    windows = []

    class Spy:
        def decode(self, window, skip_special_tokens=False):
            windows.append(len(window))
            return tokenizer.decode(window, skip_special_tokens)

    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    detokenizer.tokenizer = Spy()
    text = "".join(detokenizer.step([token]) for token in ids)
    assert text == expected(tokenizer, prompt, ids, True)
    assert len(ids) > 1000 and max(windows) <= 16


@pytest.mark.parametrize("alias", GGUF_ALIASES)
def test_one_token_cache_changes_nothing(alias):
    """One-token windows come from the tokenizer's cache: the deltas are those of plain decodes."""
    tokenizer = ours(alias)
    prompt = tokenizer.encode("System: réponds en français. 𓀀 User: ")
    for skip in (True, False):
        for text in TEXTS + ["<|im_start|>assistant\nHi!<|im_end|> 🫨🫠"]:
            ids = tokenizer.encode(text, add_special_tokens=False)
            plain = IncrementalDetokenizer(tokenizer, prompt, skip)
            plain._one_token_texts = None
            want = [plain.step([i]) for i in ids] + [plain.flush()]
            for _ in range(2):  # the cache cold, then warm
                chunks, rest = stream(tokenizer, prompt, ids, skip)
                assert chunks + [rest] == want, text
    assert tokenizer.one_token_texts[True] and tokenizer.one_token_texts[False]
    assert all(tokenizer.decode([i], skip) == text for skip in (True, False)
               for i, text in tokenizer.one_token_texts[skip].items())
