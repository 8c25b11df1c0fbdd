"""Structured output: whatever a model prefers, what comes out matches the grammar.

A tiny random model is the hard case: left alone it writes noise, so every valid output here is
the mask's doing.
"""
import json
import re

import jsonschema
import pytest

from levante import LLM, SamplingParams, StructuredOutput
from levante.errors import InvalidRequest

EMAIL = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("llama")), dtype="float32")


def _texts(llm, structured, prompt="hello", **options):
    options = {"max_tokens": 200, "temperature": 0, **options}
    (output,) = llm.generate(prompt, SamplingParams(structured=structured, **options))
    assert all(o.finish_reason == "stop" for o in output.outputs), [o.text for o in output.outputs]
    return [o.text for o in output.outputs]


@pytest.mark.parametrize("options", [{}, {"temperature": 1.0, "seed": 3}])
def test_regex_output_matches_in_full(llm, options):
    (text,) = _texts(llm, StructuredOutput("regex", EMAIL), **options)
    assert re.fullmatch(EMAIL, text), text


def test_choice_picks_one_verbatim(llm):
    choices = ["red", "green", "blue", "café"]
    texts = _texts(llm, StructuredOutput("choice", choices), n=6, temperature=1.0, seed=0)
    assert set(texts) <= set(choices)


def test_lark_grammar(llm):
    grammar = 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,3}/'
    for seed in range(3):
        (text,) = _texts(llm, StructuredOutput("lark", grammar), temperature=1.0, seed=seed)
        assert re.fullmatch(r"\(\d{1,3}(,\d{1,3})*\)", text), text


@pytest.mark.parametrize("options", [{}, {"temperature": 1.0, "seed": 0}])
def test_json_schema_output_validates(llm, options):
    (text,) = _texts(llm, StructuredOutput("json_schema", PERSON), **options)
    jsonschema.validate(json.loads(text), PERSON)


def test_json_schema_as_a_string(llm):
    (text,) = _texts(llm, StructuredOutput("json_schema", json.dumps(PERSON)), temperature=1.0, seed=1)
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_is_a_dict(llm):
    for options in ({}, {"temperature": 1.0, "seed": 5}):
        (text,) = _texts(llm, StructuredOutput("json_object"), **options)
        assert isinstance(json.loads(text), dict), text


def test_n2_each_sequence_follows_its_own_grammar_state(llm):
    spec = StructuredOutput("regex", EMAIL)
    first = _texts(llm, spec, n=2, temperature=1.0, seed=11)
    again = _texts(llm, spec, n=2, temperature=1.0, seed=11)
    assert first == again
    assert first[0] != first[1]
    assert all(re.fullmatch(EMAIL, text) for text in first), first


def test_constrained_and_free_sequences_share_a_batch(llm):
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = llm.generate("hello", free)[0].outputs[0].token_ids
    engine = llm.engine
    engine.add_request("free", "hello", free)
    engine.add_request("bound", "hello", SamplingParams(max_tokens=200, temperature=0,
                                                        structured=StructuredOutput("regex", EMAIL)))
    done = {}
    while engine.has_unfinished_requests():
        done.update((out.request_id, out) for out in engine.step() if out.finished)
    assert done["free"].outputs[0].token_ids == alone
    assert re.fullmatch(EMAIL, done["bound"].outputs[0].text)


def test_tokens_beyond_the_tokenizer_are_never_drawn(llm):
    """The tiny model's logits are wider (384) than its tokenizer (338 ids)."""
    assert llm.engine.model_config.vocab_size > llm.tokenizer.vocab_size
    (output,) = llm.generate("hello", SamplingParams(max_tokens=200, temperature=1.0, seed=2,
                                                     structured=StructuredOutput("json_schema", PERSON)))
    assert max(output.outputs[0].token_ids) < llm.tokenizer.vocab_size


@pytest.mark.parametrize("spec, words", [
    (("regex", "[a-z"), "unclosed character class"),
    (("json_schema", {"type": "frob"}), "frob"),
    (("json_schema", "{not json"), "json_schema"),
    (("lark", "start: missing_rule"), "missing_rule"),
])
def test_invalid_grammar_is_an_invalid_request(llm, spec, words):
    with pytest.raises(InvalidRequest, match=words) as error:
        llm.engine.add_request("bad", "hello", SamplingParams(structured=StructuredOutput(*spec)))
    assert "\n" not in str(error.value)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kind, value", [("xml", "x"), ("regex", ""), ("choice", []), ("json_object", {}),
                                         ("json_schema", 3)])
def test_malformed_structured_output_is_refused(kind, value):
    with pytest.raises(InvalidRequest):
        StructuredOutput(kind, value)


@pytest.mark.slow
def test_default_model_writes_a_person_as_json(default_llm):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                       "languages": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age", "languages"],
    }
    messages = [{"role": "user", "content": "Invent a software developer. Reply with JSON: name, age, languages."}]
    params = SamplingParams(max_tokens=120, temperature=0, structured=StructuredOutput("json_schema", schema))
    (output,) = default_llm.chat(messages, params)
    completion = output.outputs[0]
    assert completion.finish_reason == "stop", completion.text
    person = json.loads(completion.text)
    jsonschema.validate(person, schema)
    assert person["name"].strip() and 0 < person["age"] < 120
