"""The server's bounds on what one client may ask, each a flag with a sane default.

`RequestLimits` is read once from the command line (or built in tests) and used
by the HTTP layer (body size and time, JSON depth, connections; serve/http.py),
by request validation (serve/validate.py) and by admission (serve/pipeline.py).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


def _limit(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class RequestLimits:
    max_body_bytes: int = _limit(32 << 20, "largest request body, checked while it is read (413 past it)")
    max_json_depth: int = _limit(64, "deepest nesting of arrays and objects in a request body")
    max_prompts: int = _limit(256, "prompts in one /v1/completions request")
    max_logit_bias: int = _limit(1024, "logit_bias entries in one request")
    max_stop: int = _limit(16, "stop strings in one request")
    max_stop_length: int = _limit(1024, "characters in one stop string")
    max_messages: int = _limit(4096, "messages in one chat request")
    max_tools: int = _limit(128, "tools in one chat request")
    max_images: int = _limit(16, "images in one chat request")
    max_documents: int = _limit(1024, "documents (or text pairs) in one /v1/rerank or /v1/score request")
    max_audio_bytes: int = _limit(25 << 20, "bytes of the audio file of one /v1/audio/transcriptions request")
    max_audio_seconds: float = _limit(3600.0, "seconds of audio in one /v1/audio/transcriptions request")
    max_waiting_requests: int = _limit(256, "sequences that may wait beyond --max-num-seqs running ones before "
                                            "new requests get 429 with Retry-After")
    grammar_timeout: float = _limit(10.0, "seconds a structured-output grammar may take to compile (400 past it)")
    header_timeout: float = _limit(10.0, "seconds a connection has to send a request's headers")
    body_timeout: float = _limit(60.0, "seconds a client has to send a request's body")
    max_connections: int = _limit(1024, "open connections; past it the oldest one still sending headers "
                                        "is closed to make room")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("request limits")
        for spec in dataclasses.fields(cls):
            group.add_argument("--" + spec.name.replace("_", "-"), type=type(spec.default), default=spec.default,
                               help=f"{spec.metadata['help']} (default: {spec.default})")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> RequestLimits:
        return cls(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(cls)
                      if hasattr(args, spec.name)})
