"""FastAPI routes: /v1/completions, /v1/chat/completions (streaming and not), /v1/models, /health, /metrics."""
import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from engine.outputs import RequestOutput
from server import openapi
from server.engine_loop import Admission, EngineFailure, EngineLoop
from server.errors import APIError, error_body, error_response, from_validation
from server.prompts import PromptBuilder
from server.schemas import (
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatLogprobs,
    ChatRequest,
    ChatResponse,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    Health,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ReloadResponse,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
    encoder,
    new_id,
    now,
)


@dataclass
class ServerOptions:
    served_model_name: str
    api_key: str = ""
    max_body_bytes: int = 1 << 20


def build_app(engine_loop: EngineLoop, prompts: PromptBuilder, options: ServerOptions) -> FastAPI:
    app = FastAPI(title="dspark-serve", version="1", lifespan=lifespan,
                  description="An OpenAI-compatible server for DSpark speculative decoding (/docs renders this).")
    app.openapi = lambda: openapi.document(app)
    app.state.engine_loop, app.state.prompts, app.state.options = engine_loop, prompts, options
    app.add_middleware(Guard, api_key=options.api_key, max_body_bytes=options.max_body_bytes)
    app.add_exception_handler(APIError, api_error)
    app.include_router(router)
    return app


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.engine_loop.start()
    yield
    await asyncio.to_thread(app.state.engine_loop.stop)


async def api_error(request: Request, e: APIError) -> Response:
    return error_response(e)


router = APIRouter()


@router.get("/health")
async def health(request: Request):
    alive = request.app.state.engine_loop.thread.is_alive()
    return Response(encoder.encode(Health("ok" if alive else "stopped")), 200 if alive else 503,
                    media_type="application/json")


@router.get("/metrics")
async def metrics(request: Request):
    return Response(request.app.state.engine_loop.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/reload-calibration")
async def reload_calibration(request: Request):
    """Read the draft's sts.json again (after `python -m train calibrate --from-rounds`); the planner uses it from the
    next step. Behind the API key like every route but /health."""
    return json_response(ReloadResponse(await request.app.state.engine_loop.reload_calibration()))


@router.get("/v1/models")
async def models(request: Request):
    state = request.app.state
    card = ModelCard(state.options.served_model_name, "model", now(), "dspark", state.engine_loop.engine.config.model,
                     state.prompts.max_model_len)
    return json_response(ModelList("list", [card]))


@router.post("/v1/completions")
async def completions(request: Request):
    return await respond(request, CompletionRequest, PromptBuilder.completion, CompletionFormat)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await respond(request, ChatRequest, PromptBuilder.chat, ChatFormat)


async def respond(request: Request, schema: type, to_prompt, format_type: type) -> Response:
    """Decode the body, build the prompt, wait for the engine to admit it, then stream or collect the answer."""
    state = request.app.state
    body = await read_body(request, schema, state.options.max_body_bytes)
    token_ids, params = to_prompt(state.prompts, body)
    fmt = format_type(state.options.served_model_name, state.prompts.token_text)
    admission = state.engine_loop.submit(token_ids, params)
    try:
        await admission.admitted
    except BaseException:
        admission.release(finished=False)
        raise
    if body.stream:
        return EventStream(stream(admission, fmt, body.include_usage), admission)
    return await collect(request, admission, fmt)


async def stream(admission: Admission, fmt, include_usage: bool) -> AsyncIterator[bytes]:
    finished, first = False, True
    try:
        async for out in engine_outputs(admission.outputs):
            finished = out.finished
            if out.delta_text or out.finished or out.delta_logprobs:
                yield sse(fmt.chunk(out.delta_text, out.finish_reason, first, out.delta_logprobs))
                first = False
        if include_usage:
            yield sse(fmt.usage_chunk(usage(out)))
    except EngineFailure as e:
        finished = True
        yield sse(error_body(e.status, str(e)))
    finally:
        admission.release(finished)
    yield b"data: [DONE]\n\n"


async def collect(request: Request, admission: Admission, fmt) -> Response:
    finished = False
    gathering = asyncio.ensure_future(gather(admission))
    disconnect = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait((gathering, disconnect), return_when=asyncio.FIRST_COMPLETED)
        if not gathering.done():
            return Response(status_code=499)
        finished = True
        try:
            text, last, logprobs = gathering.result()
        except EngineFailure as e:
            raise APIError(e.status, str(e)) from e
        return json_response(fmt.full(text, last.finish_reason, usage(last), logprobs))
    finally:
        gathering.cancel()
        disconnect.cancel()
        admission.release(finished)


async def gather(admission: Admission) -> tuple[str, RequestOutput, list | None]:
    text, logprobs = "", None
    async for out in engine_outputs(admission.outputs):
        text += out.delta_text
        if out.delta_logprobs is not None:
            logprobs = (logprobs or []) + out.delta_logprobs
    return text, out, logprobs


class EventStream(StreamingResponse):
    """SSE response that releases its request even when the body is never iterated (the client left first)."""

    def __init__(self, body: AsyncIterator[bytes], admission: Admission):
        super().__init__(body, media_type="text/event-stream")
        self.admission = admission

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.admission.release(finished=False)


async def engine_outputs(outputs: asyncio.Queue) -> AsyncIterator[RequestOutput]:
    while True:
        item = await outputs.get()
        if isinstance(item, Exception):
            raise item
        yield item
        if item.finished:
            return


async def wait_disconnect(request: Request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Guard:
    """Pure ASGI middleware (no response buffering): API key on every route but /health, declared body size."""

    def __init__(self, app, api_key: str, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            request = Request(scope)
            try:
                check_auth(request, self.api_key)
                check_declared_size(request, self.max_body_bytes)
            except APIError as e:
                return await error_response(e)(scope, receive, send)
        await self.app(scope, receive, send)


def check_auth(request: Request, api_key: str):
    if not api_key or request.url.path == "/health":
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                       headers={"WWW-Authenticate": "Bearer"})


def check_declared_size(request: Request, limit: int):
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > limit:
        raise APIError(413, f"the request body is over the {limit}-byte limit or has a bad Content-Length")


async def read_body(request: Request, schema: type, limit: int):
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the request body is over the {limit}-byte limit")
    try:
        return msgspec.convert(integral_as_int(msgspec.json.decode(bytes(body))), type=schema)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise from_validation(e, bytes(body)) from e


def integral_as_int(value):
    """JSON Schema counts 2.0 as an integer: integral floats become ints (float fields take ints as they are)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integral_as_int(v) for v in value]
    if isinstance(value, dict):
        return {k: integral_as_int(v) for k, v in value.items()}
    return value


def usage(out: RequestOutput) -> Usage:
    return Usage(out.num_prompt_tokens, out.num_completion_tokens, out.num_prompt_tokens + out.num_completion_tokens,
                 PromptTokensDetails(out.num_cached_tokens))


def json_response(obj) -> Response:
    return Response(encoder.encode(obj), media_type="application/json")


def sse(obj) -> bytes:
    return b"data: " + encoder.encode(obj) + b"\n\n"


def finite(logprob: float) -> float:
    """JSON has no -inf: a token with no probability left after top-k / top-p gets OpenAI's -9999."""
    return max(logprob, -9999.0)


class CompletionFormat:
    def __init__(self, model: str, token_text):
        self.id, self.model, self.created = new_id("cmpl"), model, now()
        self.token_text, self.offset = token_text, 0  # text offset of the next token's piece

    def body(self, choices: list, usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(self.id, "text_completion", self.created, self.model, choices, usage)

    def chunk(self, text: str, finish_reason: str | None, first: bool = False, logprobs=None) -> CompletionResponse:
        return self.body([CompletionChoice(0, text, finish_reason, self.logprobs(logprobs))])

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return self.body([], usage)

    def full(self, text: str, finish_reason: str, usage: Usage, logprobs=None) -> CompletionResponse:
        return self.body([CompletionChoice(0, text, finish_reason, self.logprobs(logprobs))], usage)

    def logprobs(self, entries) -> CompletionLogprobs | None:
        if entries is None:
            return None
        pieces = [self.token_text(e.token_id) for e in entries]
        offsets = []
        for piece in pieces:
            offsets.append(self.offset)
            self.offset += len(piece)
        return CompletionLogprobs(pieces, [finite(e.logprob) for e in entries],
                                  [{self.token_text(t): finite(v) for t, v in e.top} for e in entries], offsets)


class ChatFormat(CompletionFormat):
    def __init__(self, model: str, token_text):
        super().__init__(model, token_text)
        self.id = new_id("chatcmpl")

    def body(self, choices: list, usage: Usage | None = None) -> ChatChunk:
        return ChatChunk(self.id, "chat.completion.chunk", self.created, self.model, choices, usage)

    def chunk(self, text: str, finish_reason: str | None, first: bool = False, logprobs=None) -> ChatChunk:
        delta = Delta(role="assistant" if first else None, content=text or ("" if first else None))
        return self.body([ChatChunkChoice(0, delta, finish_reason, self.logprobs(logprobs))])

    def full(self, text: str, finish_reason: str, usage: Usage, logprobs=None) -> ChatResponse:
        choices = [ChatChoice(0, Delta("assistant", text), finish_reason, self.logprobs(logprobs))]
        return ChatResponse(self.id, "chat.completion", self.created, self.model, choices, usage)

    def logprobs(self, entries) -> ChatLogprobs | None:
        if entries is None:
            return None
        return ChatLogprobs([TokenLogprobEntry(*self.entry(e.token_id, e.logprob),
                                               [TopLogprob(*self.entry(t, v)) for t, v in e.top]) for e in entries])

    def entry(self, token_id: int, logprob: float) -> tuple[str, float, list[int]]:
        piece = self.token_text(token_id)
        return piece, finite(logprob), list(piece.encode())
