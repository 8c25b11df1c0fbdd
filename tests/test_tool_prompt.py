"""What the MCP tool loop writes for the model (serve/tool_prompt.py): compact tool definitions, the
guidance, results and the answer round's request. The loop around them: tests/test_mcp_loop.py."""
import json

from levante.mcp import McpTool
from levante.serve.tool_prompt import (ANSWER_NUDGE, DESCRIPTION_CHARS, GUIDANCE, RESULT_CHARS, answer_request,
                                       first_sentence, result_text, tool_definition, with_guidance)

READ = McpTool("filesystem_read_text_file", "filesystem", "read_text_file",
               "Read the complete contents of a file from the file system as text. Handles various text "
               "encodings and provides detailed error messages if the file cannot be read.",
               {"type": "object", "$schema": "http://json-schema.org/draft-07/schema#", "additionalProperties": False,
                "properties": {"path": {"type": "string", "title": "Path"},
                               "head": {"type": "number", "description": "If provided, returns only the first N "
                                        "lines of the file. Use it for long files."}},
                "required": ["path"]})


def test_tool_definitions_keep_what_a_call_needs_and_cut_the_rest():
    definition = tool_definition(READ)
    function = definition["function"]
    assert definition["type"] == "function" and function["name"] == "filesystem_read_text_file"
    assert function["description"] == "Read the complete contents of a file from the file system as text."
    assert function["parameters"] == {"type": "object", "required": ["path"], "properties": {
        "path": {"type": "string"}, "head": {"type": "number", "description": "If provided, returns only the "
                                                                              "first N lines of the file."}}}
    assert len(json.dumps(definition)) < len(json.dumps(READ.to_openai())) * 0.75


def test_first_sentence():
    assert first_sentence("Shows the commit logs") == "Shows the commit logs"
    assert first_sentence("  Fetches a URL.\n\nAlthough originally you did not have internet access...") == \
        "Fetches a URL."
    assert first_sentence("Version 2.5 of it. More.") == "Version 2.5 of it."
    long = first_sentence("word " * 100)
    assert len(long) <= DESCRIPTION_CHARS + 3 and long.endswith("word...")


def test_guidance_joins_the_conversations_own_system_message():
    user = {"role": "user", "content": "Hi"}
    assert with_guidance([user]) == [{"role": "system", "content": GUIDANCE}, user]
    system = {"role": "system", "content": "Be brief."}
    assert with_guidance([system, user]) == [{"role": "system", "content": f"Be brief.\n\n{GUIDANCE}"}, user]
    parts = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert with_guidance([parts, user])[0]["content"] == f"Be brief.\n\n{GUIDANCE}"


def test_results_are_cut_saying_so():
    assert result_text("short") == "short"
    cut = result_text("x" * (RESULT_CHARS + 50))
    assert cut.startswith("x" * RESULT_CHARS) and cut.endswith("[... 50 more characters not shown]")


def test_the_answer_round_restates_the_last_request():
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "Read   the file\nnotes.txt"}]},
                {"role": "tool", "tool_call_id": "c", "content": "hello"}]
    assert answer_request(messages) == f"{ANSWER_NUDGE} Read the file notes.txt"
    assert answer_request([]) == ANSWER_NUDGE
