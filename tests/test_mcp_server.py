"""levante as an MCP server (`--mcp-port`): an MCP client lists and calls its `chat` tool.

The reference is levante's own /v1/chat/completions: the same greedy request must give the same text.
"""
import asyncio

import openai
import pytest

from levante import LLM, cli
from levante.mcp import McpConfig, McpToolManager
from live_server import free_port
from mcp_servers import levante_mcp_server


@pytest.fixture(scope="module")
def servers(tiny_model):
    llm = LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=256, warmup=False)
    with levante_mcp_server(llm) as urls:
        yield urls


def call_levante(url: str, arguments: dict):
    async def main():
        config = {"servers": [{"name": "levante", "source": {"type": "Http", "url": url}}]}
        manager = McpToolManager(McpConfig.from_dict(config))
        await manager.start()
        try:
            assert manager.failures == {}
            tools = manager.openai_tools()
            result = await manager.call_tool("levante_chat", arguments)
            return tools, result
        finally:
            await manager.aclose()

    return asyncio.run(main())


def test_chat_tool_answers_as_the_openai_api_does(servers):
    base, url = servers
    tools, result = call_levante(url, {"message": "Hello there", "max_tokens": 12, "temperature": 0})
    assert [t["function"]["name"] for t in tools] == ["levante_chat"]
    properties = tools[0]["function"]["parameters"]["properties"]
    assert {"message", "messages", "system", "max_tokens", "temperature"} <= set(properties)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    reference = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                               max_tokens=12, temperature=0)
    assert not result.is_error
    assert result.content == reference.choices[0].message.content and result.content

    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "And again"}]
    _, result = call_levante(url, {"messages": conversation, "system": "Be brief.", "max_tokens": 8,
                                   "temperature": 0})
    reference = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."}]
                                               + conversation, max_tokens=8, temperature=0)
    assert result.content == reference.choices[0].message.content


@pytest.mark.parametrize("arguments, needle", [
    ({}, "exactly one of"),
    ({"message": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of"),
    ({"messages": [{"role": "wizard", "content": "b"}]}, "invalid arguments"),
    ({"message": "a", "temperature": 9}, "invalid arguments"),
])
def test_bad_arguments_are_tool_errors(servers, arguments, needle):
    _, result = call_levante(servers[1], arguments)
    assert result.is_error and needle in result.content


def test_cli_reports_a_bad_mcp_config_in_one_line(tmp_path, capsys):
    config = tmp_path / "mcp.json"
    config.write_text('{"servers": [{"name": "a", "source": {"type": "Process", "command": ""}}]}')
    assert cli.main(["serve", "--mcp-config", str(config), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("levante: error: MCP config") and "servers[0].source.command" in err
    assert len(err.splitlines()) == 1
