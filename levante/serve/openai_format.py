"""Pipeline events -> OpenAI JSON for chat completions and completions: whole responses (the
collectors `ChatCompletion`, `Completion`) and streamed chunks (`ChatChunks`, `CompletionChunks`),
logprobs and usage included. The events are serve/pipeline.py's.
"""
from __future__ import annotations

from levante.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from levante.serve.pipeline import Event, Finish, McpCalls, Output, Round, Searched, ToolsOffered


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], k: int) -> list[dict]:
    content = []
    for token, position in zip(token_ids, positions):
        chosen = position[token]
        top = sorted((lp for lp in position.values() if lp.rank is not None and lp.rank <= k),
                     key=lambda lp: lp.rank)[:k]
        content.append({**_entry(chosen.decoded_token or "", chosen.logprob),
                        "top_logprobs": [_entry(lp.decoded_token or "", lp.logprob) for lp in top]})
    return content


def usage(outputs: list[RequestOutput]) -> dict:
    """Tokens of every output given (each prompt, each round), in OpenAI's shape; every API reports this."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class Rounds:
    """The latest output of each prompt in the current round, and the last ones of rounds before."""

    def __init__(self):
        self.latest: dict[int, RequestOutput] = {}
        self.past: list[RequestOutput] = []
        self.round: Round | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, Round):
            self.past += self.latest.values()
            self.latest, self.round = {}, event
        elif isinstance(event, Output):
            self.latest[event.index] = event.output

    def all(self) -> list[RequestOutput]:
        return self.past + [self.latest[i] for i in sorted(self.latest)]


def _finish_reason(c: CompletionOutput, has_tool_calls: bool = False) -> str | None:
    if c.finish_reason is None:
        return None
    if has_tool_calls:
        return "tool_calls"
    return "length" if c.finish_reason == "length" else "stop"


def chat_message(plan, text: str) -> dict:
    """A reply as OpenAI's assistant message: `content` (None beside calls or thinking when empty),
    `reasoning_content` when the model thought, `tool_calls` when it called."""
    reasoning, content, calls = plan.read_reply(text)
    message = {"role": "assistant", "content": content if (content or not (calls or reasoning)) else None}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [call.to_openai() for call in calls]
    return message


def chat_response(plan, rid: str, created: int, model: str, output: RequestOutput) -> dict:
    choices = []
    for c in output.outputs:
        message = chat_message(plan, c.text)
        calls = message.get("tool_calls")
        logprobs = {"content": chat_logprobs(c.token_ids, c.logprobs, plan.top_logprobs)} if plan.logprobs else None
        choices.append({"index": c.index, "message": message, "logprobs": logprobs,
                        "finish_reason": _finish_reason(c, bool(calls))})
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage([output])}


class ChatCompletion:
    """Chat events -> one chat.completion. The MCP loop's reply also carries `mcp_tools_offered`,
    `mcp_calls`, its own finish reason and the usage of every round; a web search adds `web_search`."""

    def __init__(self, rid: str, created: int, model: str):
        self.rid, self.created, self.model = rid, created, model
        self.rounds = Rounds()
        self.tools_offered: list[str] | None = None
        self.mcp_calls: list[dict] = []
        self.finish: str | None = None
        self.search: dict | None = None

    def add(self, event: Event) -> None:
        self.rounds.add(event)
        if isinstance(event, McpCalls):
            self.mcp_calls += event.calls
        elif isinstance(event, ToolsOffered):
            self.tools_offered = event.names
        elif isinstance(event, Finish):
            self.finish = event.reason
        elif isinstance(event, Searched):
            self.search = event.summary

    def response(self) -> dict:
        final, round_ = self.rounds.latest[0], self.rounds.round
        response = chat_response(round_.plan, self.rid, self.created, self.model, final)
        if round_.server_runs_tools:
            choice = response["choices"][0]
            if choice["message"].pop("tool_calls", None):  # calls cut off by max_tokens: not run, not the client's
                choice["message"]["content"] = round_.plan.split_reasoning(final.outputs[0].text)[1]
            choice["message"]["mcp_calls"] = self.mcp_calls
            choice["finish_reason"] = self.finish or choice["finish_reason"]
        if self.tools_offered is not None:
            response["mcp_tools_offered"] = self.tools_offered
        response["usage"] = usage(self.rounds.all())
        if self.search is not None:
            response["web_search"] = self.search
        return response


class ChatChunks:
    """Chat events -> chat.completion.chunk dicts. In rounds whose tool calls the server runs (the MCP
    loop) only content goes out: the role chunk with `mcp_tools_offered`, a chunk per executed call
    (`delta.mcp_calls`) and the loop's finish."""

    def __init__(self, rid: str, created: int, model: str, tokenizer, include_usage: bool):
        self.rid, self.created, self.model, self.tokenizer = rid, created, model, tokenizer
        self.include_usage = include_usage
        self.rounds = Rounds()
        self.role_sent: set[int] = set()
        self.writer: ChatStreamWriter | None = None

    def chunks(self, event: Event) -> list[dict]:
        self.rounds.add(event)
        if isinstance(event, ToolsOffered):  # the MCP loop begins: its role chunk says which tools it offers
            self.role_sent.add(0)
            return [{**self.chunk({"role": "assistant", "content": ""}), "mcp_tools_offered": event.names}]
        if isinstance(event, Round):
            self.writer = ChatStreamWriter(event.plan, self.rid, self.created, self.model, self.tokenizer,
                                           self.role_sent)
            if event.server_runs_tools and 0 not in self.role_sent:
                self.role_sent.add(0)
                return [self.chunk({"role": "assistant", "content": ""})]
        elif isinstance(event, Output) and event.shown:
            pieces = list(self.writer.chunks(event.output))
            if self.rounds.round.server_runs_tools:
                pieces = [p for p in pieces if p["choices"][0]["finish_reason"] is None
                          and (p["choices"][0]["delta"].get("content") or p["choices"][0]["logprobs"]
                               or p["choices"][0]["delta"].get("reasoning_content"))]
            return pieces
        elif isinstance(event, McpCalls):
            return [self.chunk({"mcp_calls": [call]}) for call in event.calls]
        elif isinstance(event, Finish):
            return [self.chunk({}, event.reason)]
        return []

    def closing(self) -> list[dict]:
        if not self.include_usage:
            return []
        return [{"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [], "usage": usage(self.rounds.all())}]

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


class ChatStreamWriter:
    """Turns successive RequestOutputs (cumulative text) of one round into chat.completion.chunk deltas."""

    def __init__(self, plan, rid: str, created: int, model: str, tokenizer, role_sent: set[int] | None = None):
        self.plan, self.rid, self.created, self.model = plan, rid, created, model
        self.role_sent = set() if role_sent is None else role_sent  # choices whose role chunk went out
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.parsers: dict[int, object] = {}  # per choice: its streaming tool parser
        self.reasoning: dict[int, object] = {}  # per choice: its streaming reasoning parser
        self.saw_calls: set[int] = set()

    def _chunk(self, choice: dict, usage_stats: dict | None = None) -> dict:
        chunk = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": [choice]}
        return chunk

    def chunks(self, output: RequestOutput):
        for c in output.outputs:
            first = c.index not in self.role_sent
            self.role_sent.add(c.index)
            delta_text = c.text[self.sent_text.get(c.index, 0):]
            self.sent_text[c.index] = len(c.text)
            new_tokens = c.token_ids[self.sent_tokens.get(c.index, 0):]
            new_logprobs = (c.logprobs or [])[self.sent_tokens.get(c.index, 0):]
            self.sent_tokens[c.index] = len(c.token_ids)
            if first:
                yield self._chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None})
            deltas = self._deltas(c.index, delta_text, finished=c.finish_reason is not None)
            logprobs = ({"content": chat_logprobs(new_tokens, new_logprobs, self.plan.top_logprobs)}
                        if self.plan.logprobs and new_tokens else None)
            for i, delta in enumerate(deltas):
                yield self._chunk({"index": c.index, "delta": delta,
                                   "logprobs": logprobs if i == 0 else None, "finish_reason": None})
            if not deltas and logprobs:
                yield self._chunk({"index": c.index, "delta": {}, "logprobs": logprobs, "finish_reason": None})
            if c.finish_reason is not None:
                reason = _finish_reason(c, c.index in self.saw_calls)
                yield self._chunk({"index": c.index, "delta": {}, "logprobs": None, "finish_reason": reason})

    def _deltas(self, index: int, text: str, finished: bool) -> list[dict]:
        """The deltas for new text: the thinking as `reasoning_content`, then the answer (through the
        tool parser, when tools were offered)."""
        out = []
        if self.plan.reasoning is not None:
            parser = self.reasoning.setdefault(index, self.plan.reasoning.stream())
            pieces = parser.finish(text) if finished else parser.feed(text)
            reasoning = "".join(piece.reasoning for piece in pieces if piece.reasoning is not None)
            if reasoning:
                out.append({"reasoning_content": reasoning})
            text = "".join(piece.content for piece in pieces if piece.content is not None)
        return out + self._answer_deltas(index, text, finished)

    def _answer_deltas(self, index: int, text: str, finished: bool) -> list[dict]:
        if self.plan.tool_parser is None:
            return [{"content": text}] if text else []
        parser = self.parsers.setdefault(index, self.plan.tool_parser.stream())
        deltas = parser.finish(text) if finished else parser.feed(text)
        out = []
        for delta in deltas:
            if delta.tool_call is not None:
                self.saw_calls.add(index)
                out.append({"tool_calls": [delta.tool_call]})
            elif delta.content:
                out.append({"content": delta.content})
        return out



def _completion_logprobs(prompt_text: str, output: RequestOutput, c: CompletionOutput, k: int, echo: bool,
                         tokenizer) -> dict:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = 0
    pairs = []
    if echo:
        for i, token in enumerate(output.prompt_token_ids):
            position = output.prompt_logprobs[i] if output.prompt_logprobs else None
            pairs.append((token, position))
    pairs += list(zip(c.token_ids, c.logprobs or []))
    for token, position in pairs:
        text = tokenizer.decode([token])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if position is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(position[token].logprob)
        top = sorted((lp for lp in position.values() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)
        tops.append({lp.decoded_token: lp.logprob for lp in top[:k]})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _prompt_text(text: str | None, output: RequestOutput, tokenizer) -> str:
    """The prompt as echoed: as the client wrote it, else its token ids decoded."""
    return text if text is not None else tokenizer.decode(output.prompt_token_ids)


class Completion:
    """Completion events -> one text_completion."""

    def __init__(self, body, rid: str, created: int, model: str, tokenizer):
        self.body, self.rid, self.created, self.model, self.tokenizer = body, rid, created, model, tokenizer
        self.rounds = Rounds()

    def add(self, event: Event) -> None:
        self.rounds.add(event)

    def response(self) -> dict:
        return completion_response(self.body, self.rid, self.created, self.model, self.rounds.all(),
                                   self.rounds.round.plan.texts, self.tokenizer)


class CompletionChunks:
    """Completion events -> text_completion chunks."""

    def __init__(self, body, rid: str, created: int, model: str, tokenizer):
        self.body = body
        self.rounds = Rounds()
        self.writer: CompletionStreamWriter | None = None
        self.rid, self.created, self.model, self.tokenizer = rid, created, model, tokenizer

    def chunks(self, event: Event) -> list[dict]:
        self.rounds.add(event)
        if isinstance(event, Round):
            self.writer = CompletionStreamWriter(self.body, self.rid, self.created, self.model, self.tokenizer,
                                                 event.plan.texts)
        elif isinstance(event, Output):
            return list(self.writer.chunks(event.index, event.output))
        return []

    def closing(self) -> list[dict]:
        if not (self.body.stream_options and self.body.stream_options.include_usage):
            return []
        return [{"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                 "choices": [], "usage": usage(self.rounds.all())}]


def completion_response(body, rid: str, created: int, model: str, outputs: list[RequestOutput],
                        texts: list[str | None], tokenizer) -> dict:
    choices = []
    for p, output in enumerate(outputs):
        prompt_text = _prompt_text(texts[p], output, tokenizer) if body.echo else ""
        for c in output.outputs:
            logprobs = None
            if body.logprobs is not None:
                logprobs = _completion_logprobs(prompt_text, output, c, body.logprobs, body.echo, tokenizer)
            choices.append({"index": p * body.n + c.index, "text": prompt_text + c.text, "logprobs": logprobs,
                            "finish_reason": _finish_reason(c)})
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(outputs)}


class CompletionStreamWriter:
    def __init__(self, body, rid: str, created: int, model: str, tokenizer, texts: list[str | None]):
        self.body, self.rid, self.created, self.model, self.tokenizer = body, rid, created, model, tokenizer
        self.texts = texts
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}

    def chunks(self, prompt_index: int, output: RequestOutput):
        body = self.body
        for c in output.outputs:
            index = prompt_index * body.n + c.index
            prefix = ""
            if index not in self.sent_text and body.echo:
                prefix = _prompt_text(self.texts[prompt_index], output, self.tokenizer)
            text = prefix + c.text[self.sent_text.get(index, 0):]
            self.sent_text[index] = len(c.text)
            start = self.sent_tokens.get(index, 0)
            self.sent_tokens[index] = len(c.token_ids)
            logprobs = None
            if body.logprobs is not None:
                partial = CompletionOutput(c.index, "", c.token_ids[start:], logprobs=(c.logprobs or [])[start:])
                logprobs = _completion_logprobs("", output, partial, body.logprobs, False, self.tokenizer)
            if not text and c.finish_reason is None and not (logprobs and logprobs["tokens"]):
                continue
            yield {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                "finish_reason": _finish_reason(c)}]}
