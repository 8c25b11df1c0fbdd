"""Reasoning output (loader/reasoning.py): the split of `<think>...</think>` from the answer, against
hand-built expectations, streamed and not; Qwen3's thinking switches; `LLM.chat`'s fields.
The server's side is tests/test_server_reasoning.py."""
import pytest

from levante import LLM, SamplingParams
from levante.engine.structured import StructuredOutput
from levante.loader.reasoning import (ReasoningDelta, ReasoningParser, prompt_opens_thinking, reasoning_markers,
                                      thinking_switch)
from tiny_reasoning import QWEN3, QWQ, template

# (reply, the prompt opened the thinking, expected reasoning, expected content)
SPLITS = [
    ("<think>\nThe user says hi.\n</think>\n\nHello there!", False, "The user says hi.", "Hello there!"),
    ("The user says hi.\n</think>\n\nHello there!", True, "The user says hi.", "Hello there!"),
    ("<think>\nThe user says hi.\n</think>\n\nHello there!", True, "The user says hi.", "Hello there!"),
    ("<think>\nStill think", False, "Still think", ""),  # cut off by max_tokens
    ("Still think", True, "Still think", ""),
    ("<think>\nAlmost </thi", False, "Almost </thi", ""),  # a tag cut in half is text
    ("Hello there!", False, None, "Hello there!"),
    ("<think>\n\n</think>\n\nHello there!", False, None, "Hello there!"),  # /no_think: empty thinking
    ("  <think>a</think>b", False, "a", "b"),
    ("I say <think>x</think> here", False, None, "I say <think>x</think> here"),  # not at the start: text
    ("Look: a < b and </ c\n</think>\n\nx </think> y", True, "Look: a < b and </ c", "x </think> y"),
    ("<think>\nmulti\n\nline  \n</think>answer  ", False, "multi\n\nline", "answer  "),
    ("", False, None, ""),
    ("", True, None, ""),
    ("\n\n", False, None, "\n\n"),
    ("<thin", False, None, "<thin"),
    ("</think>\n\nDone.", True, None, "Done."),
]


@pytest.mark.parametrize("reply, thinking, reasoning, content", SPLITS)
def test_split(reply, thinking, reasoning, content):
    assert ReasoningParser(thinking=thinking).split(reply) == (reasoning, content)


@pytest.mark.parametrize("reply, thinking, reasoning, content", SPLITS)
def test_stream_reassembles_to_the_split_at_every_cut(reply, thinking, reasoning, content):
    parser = ReasoningParser(thinking=thinking)
    feeds = [[reply[:cut], reply[cut:]] for cut in range(len(reply) + 1)] + [list(reply)]
    for pieces in feeds:
        stream = parser.stream()
        deltas = [d for piece in pieces[:-1] for d in stream.feed(piece)] + stream.finish(pieces[-1] if pieces else "")
        assert all((d.reasoning is None) != (d.content is None) for d in deltas)
        kinds = [d.reasoning is None for d in deltas]
        assert kinds == sorted(kinds)  # all the reasoning comes before any content
        streamed = "".join(d.reasoning for d in deltas if d.reasoning is not None)
        assert (streamed or None, "".join(d.content for d in deltas if d.content is not None)) == (reasoning, content)


def test_a_tag_is_held_back_until_it_is_known():
    stream = ReasoningParser().stream()
    assert stream.feed("<thi") == []
    assert stream.feed("nk>\nOne") == [ReasoningDelta(reasoning="One")]
    assert stream.feed(" two </th") == [ReasoningDelta(reasoning=" two")]
    assert stream.feed("ink>\n\n") == []
    assert stream.feed("Answer") == [ReasoningDelta(content="Answer")]


def test_which_models_think():
    assert reasoning_markers(template(QWEN3)) == ("<think>", "</think>")
    assert reasoning_markers(template(QWQ)) == ("<think>", "</think>")
    assert reasoning_markers("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert reasoning_markers("{{ messages }}", "qwen3") == ("<think>", "</think>")
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")


def test_thinking_switch():
    qwen3 = template(QWEN3)
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    assert thinking_switch(qwen3, [user("Hi /no_think")], None) == {"enable_thinking": False}
    assert thinking_switch(qwen3, [user("/no_think"), {"role": "assistant", "content": "ok"}, user("Again")],
                           {"x": 1}) == {"x": 1, "enable_thinking": False}  # the latest message with a switch
    assert thinking_switch(qwen3, [user("/no_think"), user("now /think")], None) == {"enable_thinking": True}
    assert thinking_switch(qwen3, [user("/think then /no_think")], None) == {"enable_thinking": False}
    assert thinking_switch(qwen3, [user([{"type": "text", "text": "Hi /no_think"}])], None) == {
        "enable_thinking": False}
    assert thinking_switch(qwen3, [user("Hi /no_think")], {"enable_thinking": True}) == {"enable_thinking": True}
    assert thinking_switch(qwen3, [user("see /thinking/x")], None) is None  # not a switch
    assert thinking_switch(qwen3, [{"role": "assistant", "content": "/no_think"}], None) is None
    assert thinking_switch(template(QWQ), [user("Hi /no_think")], None) is None  # QwQ always thinks


@pytest.fixture(scope="module")
def qwen3(tiny_reasoning_model):
    return LLM(str(tiny_reasoning_model(QWEN3)), dtype="float32", max_model_len=512, warmup=False)


def forced(llm, reply: str, **params) -> SamplingParams:
    """Sampling that makes the tiny random model write exactly `reply`, its think tags as the tokens
    Qwen3 writes them."""
    return SamplingParams(temperature=0, max_tokens=params.pop("max_tokens", 64),
                          structured=StructuredOutput("lark", script_grammar(llm.tokenizer, reply)), **params)


def script_grammar(tokenizer, reply: str) -> str:
    import json
    import re

    pieces = [p for p in re.split(r"(</?think>)", reply) if p]
    return "start: " + " ".join(f"<[{tokenizer.token_to_id(p)}]>" if p in ("<think>", "</think>")
                                else json.dumps(p) for p in pieces)


def test_llm_chat_exposes_the_split(qwen3):
    hi = [{"role": "user", "content": "Hi"}]
    reply = "<think>\nThe user says hi.\n</think>\n\nHello there!"
    (output,) = qwen3.chat(hi, forced(qwen3, reply))
    completion = output.outputs[0]
    assert completion.text == reply and completion.token_ids[0] == qwen3.tokenizer.token_to_id("<think>")
    assert (completion.reasoning_content, completion.content) == ("The user says hi.", "Hello there!")
    (cut,) = qwen3.chat(hi, forced(qwen3, reply, max_tokens=4))
    assert cut.outputs[0].finish_reason == "length" and cut.outputs[0].content == ""
    assert "The user says hi.".startswith(cut.outputs[0].reasoning_content)
    plain = qwen3.generate(qwen3.apply_chat_template(hi), forced(qwen3, reply))[0].outputs[0]
    assert plain.text == reply and plain.reasoning_content is None and plain.content is None  # generate: raw


def test_llm_chat_of_a_model_that_does_not_think(tiny_model):
    llm = LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=256, warmup=False)
    assert llm.chat_renderer.reasoning_markers is None
    completion = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=6))[0].outputs[0]
    assert completion.reasoning_content is None and completion.content == completion.text


def test_prompts_as_transformers_renders_them(qwen3, tiny_reasoning_model):
    """enable_thinking and the /no_think switch give the prompt Qwen3's template writes for them."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tiny_reasoning_model(QWEN3))

    def expected(messages, **kwargs):
        return reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)

    def ours(messages, kwargs=None):
        return qwen3.tokenizer.decode(qwen3.apply_chat_template(messages, chat_template_kwargs=kwargs))

    hi, no_think = [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Hi /no_think"}]
    assert ours(hi) == expected(hi) and ours(hi).endswith("<|im_start|>assistant\n")
    assert ours(hi, {"enable_thinking": False}) == expected(hi, enable_thinking=False)
    assert ours(hi, {"enable_thinking": False}).endswith("<think>\n\n</think>\n\n")
    assert ours(no_think) == expected(no_think, enable_thinking=False)
    assert ours(no_think, {"enable_thinking": True}) == expected(no_think)
    ids = qwen3.apply_chat_template(hi)
    assert not qwen3.chat_renderer.reasoning_parser(ids).thinking


def test_template_that_opens_the_thinking(tiny_reasoning_model):
    llm = LLM(str(tiny_reasoning_model(QWQ)), dtype="float32", max_model_len=512, warmup=False)
    hi = [{"role": "user", "content": "Hi"}]
    assert llm.tokenizer.decode(llm.apply_chat_template(hi)).endswith("<|im_start|>assistant\n<think>\n")
    assert llm.chat_renderer.reasoning_parser(llm.apply_chat_template(hi)).thinking
    (output,) = llm.chat(hi, forced(llm, "The user greets me.\n</think>\n\nHi!"))
    assert (output.outputs[0].reasoning_content, output.outputs[0].content) == ("The user greets me.", "Hi!")
