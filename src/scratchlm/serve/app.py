"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) over the engine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as
server-sent events with `stream: true`), the tokenizer endpoints that lm-evaluation-harness's
`tokenizer_backend=remote` and vLLM clients use (GET /tokenizer_info, POST /tokenize,
POST /detokenize), GET /health, and the chat page at GET /.

Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the status
OpenAI gives it: 400 for a bad request (malformed JSON, a bad value, a prompt or max_tokens
beyond the context), 401 for a missing or wrong API key, 404 for an unknown model or route,
429 when too many generations are in flight, 500 for a failure of the server's own (after
which it keeps serving), 503 when its generation engine is not running.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from scratchlm import __version__
from scratchlm.errors import ScratchError
from scratchlm.generate import Generation, SamplingError, TextStream, check_sampling, check_stop
from scratchlm.serve.engine import Engine, Event, NotRunning, Overloaded
from scratchlm.templates import Template

STATIC = resources.files("scratchlm.serve") / "static"
MAX_STOP = 16
MAX_LOGPROBS = 20


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type_)


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------------
# requests


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """What completions and chat share. Unknown fields are ignored, as OpenAI's API does."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    """vLLM's extension: keep the k most likely tokens (None, 0 or -1: all)."""
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    """-2**63 <= seed and seed + n - 1 < 2**64 (what torch's generator takes; choice j uses
    seed + j), checked by scratchlm.generate.check_sampling."""
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


# ------------------------------------------------------------------------------------------------
# the server's state


@dataclass
class Served:
    engine: Engine
    tokenizer: Any
    model_name: str
    template: Template | None
    api_key: str | None
    label: str
    """How the weights are held ("fp32", "int8 (fbgemm)", ...), in system_fingerprint."""
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def block(self) -> int:
        return self.engine.model.config.block_size

    @property
    def vocab(self) -> int:
        return self.engine.model.config.vocab_size

    def token_text(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")


def served(request: Request) -> Served:
    return request.app.state.served


def check_key(request: Request) -> None:
    """An optional API key, given as `Authorization: Bearer KEY` (OpenAI's clients do)."""
    key = served(request).api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), key):
        raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer KEY` "
                       "with the key the server was started with (--api-key)",
                       code="invalid_api_key")


Auth = Annotated[None, Depends(check_key)]


def check_model(s: Served, name: str | None) -> None:
    if name is not None and name != s.model_name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves "
                       f"`{s.model_name}` (GET /v1/models)", param="model",
                       code="model_not_found")


# ------------------------------------------------------------------------------------------------
# request -> generations


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} strings, got {len(stops)}",
                       param="stop")
    return stops


def check_request_sampling(req: Sampling) -> None:
    """What the library refuses, refused here as a 400 naming the field (the engine would
    otherwise fail the request later, as a 500). pydantic has checked the ranges OpenAI's API
    sets (temperature <= 2, ...); top_k 0 and -1 mean no limit, as in vLLM."""
    try:
        check_sampling(req.temperature, req.top_k if req.top_k and req.top_k > 0 else None,
                       req.top_p, seed=req.seed, n=req.n)
        check_stop(stop_strings(req.stop))
    except SamplingError as e:
        raise APIError(400, str(e), param=e.option) from None


def check_unsupported(req: Sampling) -> None:
    if req.presence_penalty or req.frequency_penalty:
        raise APIError(400, "presence_penalty and frequency_penalty are not supported by "
                       "this server; leave them at 0", param="presence_penalty")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")


def prompt_ids(s: Served, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = s.tokenizer.encode(prompt, allowed_special="all")
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < s.vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} in the prompt is outside the model's "
                           f"vocabulary (0 to {s.vocab - 1})", param="prompt")
    if not ids:  # an empty prompt starts a document, as OpenAI's models do
        if s.tokenizer.eot_id is None:
            raise APIError(400, "the prompt is empty and the tokenizer has no "
                           "<|endoftext|> to start from; give some text", param="prompt")
        ids = [s.tokenizer.eot_id]
    return ids


def check_length(s: Served, n_prompt: int, max_tokens: int) -> None:
    if n_prompt + max_tokens > s.block:
        what = (f"{n_prompt} in the prompt" if max_tokens == 0 else
                f"{n_prompt} in the prompt, {max_tokens} for the completion")
        raise APIError(400, f"This model's maximum context length is {s.block} tokens; you "
                       f"requested {n_prompt + max_tokens} tokens ({what}). Shorten the prompt "
                       "or lower max_tokens.",
                       param="max_tokens" if n_prompt < s.block else "prompt",
                       code="context_length_exceeded")


def make_generations(s: Served, req: Sampling, prompts: list[list[int]], max_tokens: int,
                     stop_ids: list[int], logprobs: int | None) -> list[Generation]:
    """n generations per prompt (prompt i's choice j at index i * n + j); a choice samples
    from a generator of its own, seeded with seed + j (a random seed when none is given)."""
    stops = stop_strings(req.stop)
    top_k = req.top_k if req.top_k and req.top_k > 0 else None
    base = req.seed if req.seed is not None else secrets.randbits(62)
    return [Generation(ids, max_tokens, req.temperature, top_k,
                       req.top_p if req.top_p < 1 else None, base + j, stop_ids,
                       TextStream(s.tokenizer, stops), logprobs)
            for ids in prompts for j in range(req.n)]


class Collector:
    """Events of a request's generations, delivered from the engine thread to the event loop."""

    def __init__(self, gens: list[Generation]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.index = {id(g): i for i, g in enumerate(gens)}
        self.gens = gens
        self.open = len(gens)

    def sink(self, gen: Generation, event: Event) -> None:  # on the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index[id(gen)], event))

    async def events(self, request: Request) -> AsyncIterator[tuple[int, Event]]:
        """Until every generation has finished. A client that goes away cancels them, so their
        rows are freed at the next step."""
        try:
            while self.open:
                try:
                    i, event = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if event.finish_reason is not None:
                    self.open -= 1
                yield i, event
        finally:
            for g in self.gens:
                g.cancelled = True  # no effect on a finished one


def submit(s: Served, gens: list[Generation], n: int) -> Collector:
    """Hand a request's generations (n per prompt) to the engine."""
    limit = s.engine.max_pending
    if len(gens) > limit:  # never admitted however long one waits: not a 429 to retry
        what = f"n is {n}" if len(gens) == n else f"{len(gens) // n} prompts x n {n}"
        raise APIError(400, f"this request asks for {len(gens)} generations ({what}) and this "
                       f"server holds at most {limit} in flight (its --max-pending); lower n "
                       "or send fewer prompts per request", param="n" if n > limit else "prompt")
    collector = Collector(gens)
    try:
        s.engine.submit(gens, collector.sink)
    except Overloaded as e:
        raise APIError(429, str(e), type_="rate_limit_exceeded",
                       code="rate_limit_exceeded") from None
    except NotRunning as e:
        raise APIError(503, str(e), type_="server_error", code="engine_not_running") from None
    return collector


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ------------------------------------------------------------------------------------------------
# completions


class LegacyLogprobs:
    """The completions API's logprobs: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, s: Served, offset: int = 0) -> None:
        self.s = s
        self.offset = offset
        self.data: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                      "text_offset": []}

    def add(self, token: int, lp: float | None, top: list[tuple[int, float]] | None) -> None:
        text = self.s.token_text(token)
        self.data["tokens"].append(text)
        self.data["token_logprobs"].append(lp)
        if top is None:
            self.data["top_logprobs"].append(None)
        else:
            alternatives = {self.s.token_text(t): v for t, v in top}
            alternatives[text] = lp  # the chosen token is among them, as vLLM gives it
            self.data["top_logprobs"].append(alternatives)
        self.data["text_offset"].append(self.offset)
        self.offset += len(text)

    def take(self) -> dict:
        """What was added since the last take (a streamed chunk's share)."""
        out = self.data
        self.data = {k: [] for k in out}
        return out


async def completions(req: CompletionRequest, request: Request, s: Served):
    check_model(s, req.model)
    check_unsupported(req)
    check_request_sampling(req)
    if req.suffix:
        raise APIError(400, "suffix is not supported by this server", param="suffix")
    if req.best_of not in (None, req.n):
        raise APIError(400, "best_of must equal n on this server", param="best_of")
    raw = req.prompt
    many = isinstance(raw, list) and bool(raw) and not isinstance(raw[0], int)
    prompts = raw if many else [raw]
    if raw == [] or any(p == [] for p in prompts):
        raise APIError(400, "prompt is an empty list; give a string, strings or token ids",
                       param="prompt")
    ids = [prompt_ids(s, p) for p in prompts]
    max_tokens = req.max_tokens if req.max_tokens is not None else \
        s.block - max(len(p) for p in ids)
    for p in ids:
        check_length(s, len(p), max_tokens)
    if max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens is 0 without echo: there is nothing to return",
                       param="max_tokens")
    n_choices = len(ids) * req.n
    echo_lps: list = [None] * len(ids)
    if req.echo and req.logprobs is not None:
        futures = [asyncio.wrap_future(s.engine.prompt_logprobs(p, req.logprobs)) for p in ids]
        echo_lps = await asyncio.gather(*futures)
    gens = (make_generations(s, req, ids, max_tokens, stop_eot(s), req.logprobs)
            if max_tokens > 0 else [])
    collector = submit(s, gens, req.n) if gens else None
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    texts = [""] * n_choices
    lps = [LegacyLogprobs(s) if req.logprobs is not None else None for _ in range(n_choices)]
    for c in range(n_choices):  # echo: the prompt comes first
        if req.echo:
            p = c // req.n
            texts[c] = s.tokenizer.decode(ids[p]) if isinstance(prompts[p], list) else prompts[p]
            if lps[c] is not None:
                lps[c].add(ids[p][0], None, None)
                for t, (lp, top) in zip(ids[p][1:], echo_lps[p]):
                    lps[c].add(t, lp, top)
    finish = ["length"] * n_choices if not gens else [None] * n_choices
    prompt_tokens = sum(len(p) for p in ids)

    def chunk(c: int, text: str, reason: str | None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created,
                "model": s.model_name, "system_fingerprint": fingerprint(s),
                "choices": [{"index": c, "text": text, "finish_reason": reason,
                             "logprobs": lps[c].take() if lps[c] is not None else None}]}

    if req.stream:
        async def body() -> AsyncIterator[str]:
            for c in range(n_choices):
                if texts[c] or (lps[c] is not None and lps[c].data["tokens"]):
                    yield sse(chunk(c, texts[c], finish[c]))
            completion_tokens = 0
            if collector is not None:
                async for c, ev in collector.events(request):
                    if ev.error:
                        yield sse({"error": {"message": ev.error, "type": "server_error",
                                             "param": None, "code": None}})
                        return
                    if ev.token is not None:
                        completion_tokens += 1
                        if lps[c] is not None and ev.logprob is not None:
                            lps[c].add(ev.token, ev.logprob[0], ev.logprob[1])
                    yield sse(chunk(c, ev.text, ev.finish_reason))
            if req.stream_options and req.stream_options.include_usage:
                yield sse({"id": rid, "object": "text_completion", "created": created,
                           "model": s.model_name, "choices": [],
                           "usage": usage(prompt_tokens, completion_tokens)})
            yield sse("[DONE]")
        return StreamingResponse(body(), media_type="text/event-stream")

    completion_tokens = 0
    if collector is not None:
        async for c, ev in collector.events(request):
            if ev.error:
                raise APIError(500, ev.error, type_="server_error")
            texts[c] += ev.text
            if ev.token is not None:
                completion_tokens += 1
                if lps[c] is not None and ev.logprob is not None:
                    lps[c].add(ev.token, ev.logprob[0], ev.logprob[1])
            finish[c] = ev.finish_reason or finish[c]
    return {"id": rid, "object": "text_completion", "created": created, "model": s.model_name,
            "system_fingerprint": fingerprint(s),
            "choices": [{"index": c, "text": texts[c], "finish_reason": finish[c],
                         "logprobs": lps[c].data if lps[c] is not None else None}
                        for c in range(n_choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


def stop_eot(s: Served) -> list[int]:
    return [s.tokenizer.eot_id] if s.tokenizer.eot_id is not None else []


def fingerprint(s: Served) -> str:
    return f"scratchlm-{__version__}-{s.label.split()[0]}"


# ------------------------------------------------------------------------------------------------
# chat


def conversation(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI messages as the template's conversation: text parts joined, "developer" (OpenAI's
    newer name for it) as "system"."""
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def chat_ids(s: Served, messages: list[ChatMessage]) -> list[int]:
    if s.template is None:
        raise APIError(400, f"`{s.model_name}` is a base model with no chat template (no "
                       "template.json beside it); use /v1/completions, or fine-tune it with "
                       "a template first", param="messages", code="no_chat_template")
    try:
        return s.template.encode(s.tokenizer, conversation(messages),
                                 add_generation_prompt=True)[0]
    except ScratchError as e:
        raise APIError(400, str(e), param="messages") from None


def chat_logprobs(s: Served, token: int, lp: tuple[float, list[tuple[int, float]]]) -> dict:
    def entry(t: int, v: float) -> dict:
        return {"token": s.token_text(t), "logprob": v, "bytes": list(s.tokenizer.token_bytes(t))}
    return {**entry(token, lp[0]), "top_logprobs": [entry(t, v) for t, v in lp[1]]}


async def chat_completions(req: ChatRequest, request: Request, s: Served):
    check_model(s, req.model)
    check_unsupported(req)
    check_request_sampling(req)
    ids = chat_ids(s, req.messages)
    asked = req.max_completion_tokens or req.max_tokens
    max_tokens = asked if asked is not None else s.block - len(ids)
    if max_tokens < 1:
        raise APIError(400, f"This model's maximum context length is {s.block} tokens and "
                       f"the messages take {len(ids)}; shorten them", param="messages",
                       code="context_length_exceeded")
    check_length(s, len(ids), max_tokens)
    want = (req.top_logprobs or 0) if req.logprobs else None
    stops = s.template.stop_ids(s.tokenizer)
    gens = make_generations(s, req, [ids], max_tokens, stops, want)
    collector = submit(s, gens, req.n)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(c: int, delta: dict, reason: str | None, lp: dict | None = None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": s.model_name, "system_fingerprint": fingerprint(s),
                "choices": [{"index": c, "delta": delta, "finish_reason": reason,
                             "logprobs": {"content": [lp]} if lp else None}]}

    if req.stream:
        async def body() -> AsyncIterator[str]:
            for c in range(req.n):
                yield sse(chunk(c, {"role": "assistant", "content": ""}, None))
            completion_tokens = 0
            async for c, ev in collector.events(request):
                if ev.error:
                    yield sse({"error": {"message": ev.error, "type": "server_error",
                                         "param": None, "code": None}})
                    return
                lp = None
                if ev.token is not None:
                    completion_tokens += 1
                    if ev.logprob is not None:
                        lp = chat_logprobs(s, ev.token, ev.logprob)
                if ev.text or lp:
                    yield sse(chunk(c, {"content": ev.text}, None, lp))
                if ev.finish_reason is not None:
                    yield sse(chunk(c, {}, ev.finish_reason))
            if req.stream_options and req.stream_options.include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": s.model_name, "choices": [],
                           "usage": usage(len(ids), completion_tokens)})
            yield sse("[DONE]")
        return StreamingResponse(body(), media_type="text/event-stream")

    texts, finish = [""] * req.n, [None] * req.n
    lps: list[list[dict]] = [[] for _ in range(req.n)]
    completion_tokens = 0
    async for c, ev in collector.events(request):
        if ev.error:
            raise APIError(500, ev.error, type_="server_error")
        texts[c] += ev.text
        if ev.token is not None:
            completion_tokens += 1
            if ev.logprob is not None:
                lps[c].append(chat_logprobs(s, ev.token, ev.logprob))
        finish[c] = ev.finish_reason or finish[c]
    return {"id": rid, "object": "chat.completion", "created": created, "model": s.model_name,
            "system_fingerprint": fingerprint(s),
            "choices": [{"index": c, "message": {"role": "assistant", "content": texts[c]},
                         "finish_reason": finish[c],
                         "logprobs": {"content": lps[c]} if req.logprobs else None}
                        for c in range(req.n)],
            "usage": usage(len(ids), completion_tokens)}


# ------------------------------------------------------------------------------------------------
# the app


def model_card(s: Served) -> dict:
    return {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "scratchlm",
            "max_model_len": s.block, "quantization": s.label,
            "chat_template": s.template.name if s.template else None}


def create_app(engine: Engine, tokenizer, model_name: str, template: Template | None = None,
               api_key: str | None = None, label: str = "fp32") -> FastAPI:
    """The app; it starts the engine's thread when it starts and stops it when it stops."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="scratchlm", version=__version__, lifespan=lifespan)
    app.state.served = Served(engine, tokenizer, model_name, template, api_key, label)
    install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        e = served(request).engine
        # ok only while the engine thread runs: a server whose engine died must not look
        # healthy to a load balancer while every request to it hangs
        return JSONResponse({"status": "ok" if e.alive else "error", "running": e.running,
                             "pending": e.pending, "max_batch": e.max_batch,
                             "max_pending": e.max_pending}, status_code=200 if e.alive else 503)

    @app.get("/v1/models")
    async def models(request: Request, _: Auth) -> dict:
        return {"object": "list", "data": [model_card(served(request))]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request, _: Auth) -> dict:
        s = served(request)
        check_model(s, name)
        return model_card(s)

    @app.post("/v1/completions")
    async def post_completions(req: CompletionRequest, request: Request, _: Auth):
        return await completions(req, request, served(request))

    @app.post("/v1/chat/completions")
    async def post_chat(req: ChatRequest, request: Request, _: Auth):
        return await chat_completions(req, request, served(request))

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request, _: Auth) -> dict:
        s = served(request)
        eot = "<|endoftext|>" if s.tokenizer.eot_id is not None else None
        return {"tokenizer_class": "scratchlm.BPETokenizer", "eos_token": eot,
                "bos_token": None, "pad_token": None, "model_max_length": s.block,
                "vocab_size": s.tokenizer.vocab_size,
                "chat_template": s.template.jinja if s.template else None}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest, request: Request, _: Auth) -> dict:
        s = served(request)
        check_model(s, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            ids = chat_ids(s, req.messages)
        else:
            ids = s.tokenizer.encode(req.prompt, allowed_special="all")
        return {"count": len(ids), "max_model_len": s.block, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, request: Request, _: Auth) -> dict:
        s = served(request)
        check_model(s, req.model)
        bad = [t for t in req.tokens if not 0 <= t < s.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0 to "
                           f"{s.tokenizer.vocab_size - 1})", param="tokens")
        return {"prompt": s.tokenizer.decode(req.tokens)}

    return app


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return error_response(e.status, e.message, e.type, e.param, e.code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "We could not parse the JSON body of your request: "
                                  f"{first.get('ctx', {}).get('error', 'malformed JSON')}. "
                                  "Send a JSON object.", code="invalid_json")
        message, param = validation_message(first)
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}; the API is under /v1",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(
            e.status_code, str(e.detail))
        return error_response(e.status_code, message, code=str(e.status_code))

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> JSONResponse:
        import logging

        logging.getLogger("scratchlm.serve").exception("request failed")
        return error_response(500, f"the server failed: {type(e).__name__}: {e}",
                              type_="server_error")


def validation_message(error: dict) -> tuple[str, str | None]:
    """(message, param) of pydantic's first complaint: the field's path without the type
    names a union adds to it ("prompt.list[int].0" -> "prompt.0")."""
    types = ("str", "int", "float", "bool", "list", "dict", "function")
    path = [str(x) for x in error.get("loc", ()) if x != "body"]
    path = [x for x in path if not x.startswith(types)]
    msg = error.get("msg", "invalid value")
    if not path:
        return f"the request body is invalid: {msg}", None
    return f"{'.'.join(path)}: {msg}", path[0]
