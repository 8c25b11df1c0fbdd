"""The Python API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`.

An embedding model (a sentence-transformers folder or alias) loads an `Embedder`
instead of the generation engine: `LLM("all-minilm:l6-v2").embed(texts)`.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from collections.abc import Iterator, Sequence

from levante.engine.args import EngineArgs
from levante.engine.embedder import EmbeddingInput, Embedder
from levante.engine.engine import Engine
from levante.engine.outputs import RequestOutput
from levante.engine.sampling_params import SamplingParams
from levante.errors import InvalidRequest, RequestFailed
from levante.loader.auto import TASKS, model_task
from levante.loader.chat_prompt import ChatRenderer
from levante.multimodal.inputs import MultiModalPrompt
from levante.multimodal.messages import to_image

Prompt = str | list[int] | MultiModalPrompt


class LLM:
    """Loads a model (HF folder, .gguf file, alias or Hub name such as "org/name", "org/name:Q4_K_M"
    with `gguf_file` to name the file exactly) and generates from it, or embeds with it.

    Keyword arguments configure the engine: `dtype`, `device`, `max_model_len`,
    `max_num_seqs`, `max_num_batched_tokens`, `block_size`, `kv_cache_gb`,
    `num_kv_blocks`, `enable_prefix_caching`, `num_threads`, `warmup`, and
    `quantization`: "auto" (default: GGUF weights stay quantised, packed int8/int4),
    "none" (dequantise to `dtype`), "int8" or "int4" (in-situ quantisation of any model).
    Scale-out: `tensor_parallel_size` (worker processes started here, or torchrun's ranks),
    `device_map` ("auto" or "0:12;1:12") and `topology` (a YAML file: per-layer device and
    quantization). With tensor parallelism, `close()` (or `with LLM(...)`) stops the workers now;
    an LLM dropped without it stops them when collected, and a new tensor-parallel LLM takes the group over.
    CUDA: `enforce_eager` (no CUDA graphs for decode steps), `cuda_graph_max_batch` (default 256).
    LoRA: `lora={"name": "path/to/peft-adapter", ...}` loads adapters at start (`load_lora` and
    `unload_lora` at run time; at most `max_loras`, each of rank at most `max_lora_rank`); a request
    applies one with `SamplingParams(lora="name")`, and one batch may mix adapters and the base model.
    Speculative decoding (off by default): `speculative_method` "ngram" (prompt lookup, tuned by
    `prompt_lookup_min` / `prompt_lookup_max`) or "draft" (with `draft_model`, a smaller model with the
    same tokenizer), `num_speculative_tokens` (default 5) checked per step.
    """

    def __init__(self, model: str | None = None, **options):
        try:
            args = EngineArgs(model=model, **options)
        except TypeError as e:
            raise TypeError(f"unknown LLM option: {e}") from None
        if args.data_parallel_size != 1:
            raise InvalidRequest("data_parallel_size: an LLM is one engine; `levante serve --data-parallel-size N` "
                                 "serves N replicas")
        self.args = args
        self.model_name = args.model_name
        self.engine: Engine | None = None
        self.embedder: Embedder | None = None
        self.scorer = None  # engine/scorer.py's Scorer, for a reranker
        self.transcriber = None  # engine/transcriber.py's Transcriber, for a speech-recognition model
        self._ids = itertools.count()
        self.task = args.task or model_task(self.model_name, args.progress)
        if self.task not in TASKS:
            raise InvalidRequest(f"task '{self.task}': expected one of {', '.join(TASKS)}")
        if self.task != "generate":
            self._load_runner(args)
            return
        self.engine = Engine(self.model_name, args.engine_config(), progress=args.progress)
        self.tokenizer = self.engine.tokenizer
        self.chat_renderer = ChatRenderer(self.tokenizer, self.engine.processor, self.model_name,
                                          self.engine.model_config.model_type)

    def _load_runner(self, args: EngineArgs) -> None:
        """A model that does not generate: what runs it, with no chat template."""
        config = args.engine_config()
        if self.task == "embed":
            self.embedder = Embedder.load(self.model_name, config)
        elif self.task == "score":
            from levante.engine.scorer import Scorer

            self.scorer = Scorer.load(self.model_name, config)
        else:
            from levante.engine.transcriber import Transcriber

            self.transcriber = Transcriber.load(self.model_name, config)
        self.tokenizer, self.chat_renderer = self.runner.tokenizer, None

    @property
    def runner(self):
        """What runs the model: its Engine, Embedder, Scorer or Transcriber."""
        return self.engine or self.embedder or self.scorer or self.transcriber

    @property
    def max_batch_size(self) -> int:
        """Sequences (texts, pairs, audio chunks) one step or forward takes at most."""
        return self.engine.config.max_num_seqs if self.engine is not None else self.runner.max_batch_size

    # -- sleep (vLLM's LLM.sleep / wake_up) -------------------------------------
    @property
    def asleep(self) -> bool:
        return self.runner.asleep

    def sleep(self) -> None:
        """Give the weights (and a generating model's KV cache) back to the system; the tokenizer, chat
        template, grammar tables, adapters and settings stay, so `wake_up` loads only the weights again."""
        self.runner.sleep()

    def wake_up(self) -> None:
        self.runner.wake_up()

    @property
    def chat_template(self):
        """The model's chat template (its own, or the fallback), or None for an embedding model."""
        return self.chat_renderer.template if self.chat_renderer is not None else None

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLM:
        """Load the model `args` names, configured by them (the CLI, the server and the TUI start here)."""
        return cls(args.model, **args.options())

    def load_lora(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter folder under `name`, for requests with `SamplingParams(lora=name)`."""
        self._require_engine().load_lora(name, path)

    def unload_lora(self, name: str) -> None:
        self._require_engine().unload_lora(name)

    def memory_bytes(self) -> int:
        """What the model holds in memory: its weights, and the KV cache of a generating model."""
        return self.runner.memory_bytes()

    def close(self) -> None:
        """Release what outlives the object: tensor-parallel worker processes (also done when the LLM is
        collected, or at exit)."""
        if self.engine is not None:
            self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_embedding_model(self) -> bool:
        return self.embedder is not None

    def embed(self, inputs: EmbeddingInput, *, dimensions: int | None = None, prompt_name: str | None = None,
              prompt: str | None = None, as_tensor: bool = False):
        """One vector per input (a text, texts, or token-id lists): list[list[float]], or a float32 tensor.

        `prompt_name` picks one of the model's prompts ("query", "document", ...), `prompt`
        gives the prefix itself; `dimensions` truncates (and renormalises) Matryoshka models.
        """
        if self.embedder is None:
            raise InvalidRequest(f"'{self.model_name}' is not an embedding model; load one to embed")
        ids = self.embedder.token_ids(inputs, prompt_name, prompt)
        vectors = self.embedder.embed(ids, dimensions)
        return vectors if as_tensor else vectors.tolist()

    def score(self, query: str | list[str], documents: list[str]) -> list[float]:
        """The relevance of each document to the query (or to `query[i]`, given one query per document):
        a reranker's score, or an embedding model's cosine similarity."""
        queries = [query] * len(documents) if isinstance(query, str) else list(query)
        if len(queries) != len(documents):
            raise InvalidRequest(f"{len(queries)} queries for {len(documents)} documents")
        if self.scorer is not None:
            return self.scorer.score(self.scorer.pairs(queries, documents)).tolist()
        if self.embedder is None:
            raise InvalidRequest(f"'{self.model_name}' is not a reranker or an embedding model: it cannot score")
        from levante.layers.pooling import cosine_similarity

        vectors = self.embed(queries + documents, as_tensor=True)
        return cosine_similarity(vectors[:len(queries)], vectors[len(queries):]).tolist()

    def transcribe(self, audio, language: str | None = None, prompt: str | None = None, timestamps: bool = False,
                   temperature: float = 0.0):
        """What a speech-recognition model (Whisper) hears in `audio`: a file's path or bytes (wav, mp3,
        flac, ogg), or float32 samples at 16 kHz. -> `Transcript` (text, duration, language, segments;
        with `timestamps`, segments timed by the model)."""
        if self.transcriber is None:
            raise InvalidRequest(f"'{self.model_name}' is not a speech-recognition model: it cannot transcribe")
        from levante.multimodal.audio import decode_audio_file

        if isinstance(audio, (str, bytes, Path)):
            raw = audio if isinstance(audio, bytes) else Path(audio).read_bytes()
            audio = decode_audio_file(raw).resampled(self.transcriber.sampling_rate)
        decoding = self.transcriber.decoding(language, prompt, timestamps, temperature)
        return self.transcriber.transcribe(audio, decoding)

    def _require_engine(self) -> Engine:
        if self.engine is None:
            raise InvalidRequest(f"'{self.model_name}' is {_DOES[self.task]}; it does not generate")
        return self.engine

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 images: list | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids) in one continuous batch; outputs in prompt order.
        `params` applies to every prompt, or is a list with one per prompt (as vLLM takes it).

        Vision-language models: `images` (PIL images, paths or URLs) for a single prompt, or one
        list per prompt; each prompt writes one image placeholder per image (for Qwen-VL
        "<|vision_start|><|image_pad|><|vision_end|>", `llm.engine.processor.image_placeholder`).
        A prompt may also be a ready `MultiModalPrompt`.
        """
        self._require_engine()
        if images is not None:
            prompts = self._with_images(prompts, images)
        # Only finished outputs are read here: the engine builds no output for a running request.
        if isinstance(params, Sequence):
            params = [dataclasses.replace(p, output_kind="final_only") for p in params]
        else:
            params = dataclasses.replace(params or SamplingParams(), output_kind="final_only")
        ids = self._submit(prompts, params)
        finished: dict[str, RequestOutput] = {}
        try:
            while len(finished) < len(ids):
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
        finally:
            for rid in ids:
                if rid not in finished:
                    self.engine.abort_request(rid)
        outputs = [finished[rid] for rid in ids]
        for index, output in enumerate(outputs):
            _raise_if_failed(output, index)
        return outputs

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that adds to it; text is cumulative."""
        self._require_engine()
        (rid,) = self._submit([prompt], params)
        done = False
        try:
            while not done:
                for output in self.engine.step():
                    if output.request_id == rid:
                        done = output.finished
                        _raise_if_failed(output)
                        yield output
        finally:
            if not done:
                self.engine.abort_request(rid)

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             tools: list[dict] | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Render each conversation through the model's chat template, then generate.

        Messages are OpenAI's: content may be a list of parts, `{"type": "text", "text": ...}`,
        `{"type": "image_url", "image_url": {"url": data URL | http(s) URL | path}}` or
        `{"type": "image", "image": PIL.Image}` (vision-language models only), or
        `{"type": "input_audio", "input_audio": {"data": base64, "format": "wav" | "mp3"}}` (Gemma 3n);
        an assistant's `tool_calls[].function.arguments` may be JSON text. `chat_template_kwargs` reach the
        template as variables (e.g. `enable_thinking`, `reasoning_effort`). The server renders the same way.

        Each output's `content` is the answer and, for a reasoning model (Qwen3, QwQ, ...),
        `reasoning_content` its thinking (`<think>...</think>`, None when it did not think), split as the
        server splits them; `text` is the whole reply.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(c, tools, add_generation_prompt, chat_template_kwargs) for c in conversations]
        if self.chat_renderer.reasoning_needs_special_tokens:
            params = dataclasses.replace(params or SamplingParams(), skip_special_tokens=False)
        outputs = self.generate(prompts, params)
        for prompt, output in zip(prompts, outputs):
            ids = prompt.token_ids if isinstance(prompt, MultiModalPrompt) else prompt
            reasoning = self.chat_renderer.reasoning_parser(ids)
            for completion in output.outputs:
                completion.reasoning_content, completion.content = (
                    reasoning.split(completion.text) if reasoning else (None, completion.text))
        return outputs

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None
                            ) -> list[int]:
        """The conversation's prompt token ids, as the engine runs them (images expanded)."""
        prompt = self.chat_prompt(messages, tools, add_generation_prompt, chat_template_kwargs)
        return prompt.token_ids if isinstance(prompt, MultiModalPrompt) else prompt

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                    chat_template_kwargs: dict | None = None) -> list[int] | MultiModalPrompt:
        """Token ids of the rendered conversation; with images, a `MultiModalPrompt`."""
        self._require_engine()
        return self.chat_renderer.render(messages, tools, add_generation_prompt,
                                         template_kwargs=chat_template_kwargs)

    def _processor(self):
        processor = self._require_engine().processor
        if processor is None:
            raise InvalidRequest(f"'{self.model_name}' does not take images")
        return processor

    def _with_images(self, prompts, images: list) -> list[MultiModalPrompt]:
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        prompts, per_prompt = ([prompts], [images]) if single else (list(prompts), images)
        if len(per_prompt) != len(prompts):
            raise InvalidRequest(f"{len(prompts)} prompts but {len(per_prompt)} image lists")
        processor, out = self._processor(), []
        for prompt, imgs in zip(prompts, per_prompt):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            out.append(processor.process(ids, [to_image(image) for image in imgs]))
        return out

    def _submit(self, prompts, params: SamplingParams | None) -> list[str]:
        if isinstance(prompts, (str, MultiModalPrompt)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        per_prompt = params if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise InvalidRequest(f"{len(prompts)} prompts but {len(per_prompt)} SamplingParams")
        ids = []
        try:
            for prompt, prompt_params in zip(prompts, per_prompt):
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, prompt, prompt_params)
                ids.append(rid)
        except BaseException:  # a bad prompt or adapter name: none of the batch runs
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return ids


# What a model that does not generate does instead.
_DOES = {"embed": "an embedding model: it embeds (embed())", "score": "a reranker: it scores (score())",
         "transcribe": "a speech-recognition model: it transcribes (transcribe())"}


def _raise_if_failed(output: RequestOutput, index: int | None = None) -> None:
    if output.error is not None:
        where = "" if index is None else f" (prompt {index})"
        raise RequestFailed(f"the engine failed on this request{where}: {output.error}")
