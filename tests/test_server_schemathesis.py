"""Schemathesis against the server's own /openapi.json: every route, valid and invalid bodies.

Whatever it sends, the answer is never a 5xx and the server keeps answering. Bounded: a fixed number
of examples per operation, on a tiny model with a short context. Images may only come as data URLs
here (no file is read, nothing is fetched: tests send traffic to loopback only).
"""
import functools
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from levante import LLM
from levante.multimodal.images import load_image
from live_server import live_server

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("LEVANTE_SCHEMATHESIS_EXAMPLES", "25"))  # per operation and mode; 15 operations


@pytest.fixture(scope="module")
def server(tiny_model, minilm, tmp_path_factory):
    from levante.serve.webui import WebUI

    llm = LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=128, warmup=False)
    webui = WebUI(store_path=tmp_path_factory.mktemp("store") / "chats.sqlite3")  # the conversation routes too
    with live_server(llm, "tiny", embedding_llm=minilm, embedding_name="minilm", webui=webui) as (base, state):
        state.load_image = functools.partial(load_image, local_paths=False, max_bytes=1 << 20)
        state.load_image = _data_urls_only(state.load_image)
        yield base, state


def _data_urls_only(load):
    from levante.errors import InvalidRequest

    def load_data_url(source, **kwargs):
        if not (isinstance(source, str) and source.startswith("data:")):
            raise InvalidRequest("image: only data URLs in this test")
        return load(source, **kwargs)
    return load_data_url


def operations(base: str):
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_server_errors(server, mode):
    checked = []
    for operation in operations(server[0]):
        @given(case=operation.as_strategy(mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.generate])
        def call(case):
            response = case.call(timeout=60)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])

        try:
            call()
        except Unsatisfiable:  # nothing to get wrong in a GET without parameters
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.label
            continue
        checked.append(operation.label)
    assert len(checked) >= (15 if mode is GenerationMode.POSITIVE else 11), checked  # every route exercised


def test_the_server_still_answers_and_holds_nothing(server):
    base, state = server
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    engine = state.llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert state.pipeline.in_flight == 0
