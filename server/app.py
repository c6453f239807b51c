"""The OpenAI-compatible HTTP front end over a defended vLLM engine.

``create_app`` builds a FastAPI app: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (streaming or not), ``/v1/defense``, ``/health`` and
``/metrics``. The caller's API key selects a policy tier (a FastAPI
dependency), and the tier alone decides the defense put into
``SamplingParams.extra_args``. What the engine returns as logprobs is already
the released distribution (the engine runs with ``processed_logprobs``);
prompt logprobs are computed by vLLM from the raw teacher, so they are refused.

Not for: the engine's life cycle (:mod:`distillgame.server.supervisor`), the
policy file (:mod:`distillgame.server.policy`), the defense math (``plugins``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distillgame.server.limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    BodyLimitMiddleware,
    ErrorShieldMiddleware,
)
from distillgame.server.metrics import ServerMetrics
from distillgame.server.policy import ENGINE_FIELDS as _ENGINE_FIELDS
from distillgame.server.policy import AuthError, Policy, RateLimiter, Tier, identify
from distillgame.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    ChatTokenLogprob,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    Usage,
)
from distillgame.server.supervisor import EngineSupervisor, EngineUnavailable

logger = logging.getLogger(__name__)

# JSON has no -inf; a token the defense rules out entirely is reported at this floor (as vLLM does).
_LOGPROB_FLOOR = -9999.0


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: int | None = None) -> None:
        # Messages may quote caller input (a model name, a parameter): keep them encodable as UTF-8 JSON.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))


@dataclass
class Caller:
    tier: Tier
    ident: str  # rate-limit bucket: a digest prefix of the key, never the key itself


@dataclass
class ServerState:
    policy: Policy
    supervisor: EngineSupervisor
    metrics: ServerMetrics
    model_name: str
    max_model_len: int
    limiter: RateLimiter = field(default_factory=RateLimiter)
    on_fatal: Callable[[str], None] | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S


def _error_response(exc: APIError) -> JSONResponse:
    headers = None
    if exc.status in (429, 503):
        headers = {"Retry-After": str(exc.retry_after if exc.retry_after is not None else 5)}
    return JSONResponse(exc.body.model_dump(), status_code=exc.status, headers=headers)


def _sse(payload: Any) -> str:
    data = payload.model_dump_json(exclude_none=False) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


def _check_text(text: str, param: str) -> str:
    """Refuse strings that are not valid Unicode text (JSON can carry lone surrogates; tokenizers choke on them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param} is not valid Unicode text (lone surrogate escape)", param=param,
                       code="invalid_text") from None
    return text


def _lp(value: float) -> float:
    return value if math.isfinite(value) else _LOGPROB_FLOOR


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def boot() -> None:
            try:
                await state.supervisor.start()
            except Exception as exc:
                logger.exception("engine failed to start")
                state.supervisor.mark_failed(f"engine failed to start: {exc}")
                if state.on_fatal:
                    state.on_fatal(str(exc))

        task = asyncio.create_task(boot(), name="engine-boot")
        try:
            yield
        finally:
            task.cancel()
            await state.supervisor.stop()

    app = FastAPI(title="distillgame", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    # Outermost: oversized or trickling bodies are refused before anything parses them.
    # No CORS middleware on purpose: browsers on other origins get no Access-Control-* headers.
    app.add_middleware(ErrorShieldMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.max_body_bytes, timeout_s=state.body_timeout_s)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, exc: EngineUnavailable) -> JSONResponse:
        return _error_response(APIError(503, str(exc), type="service_unavailable", code="engine_unavailable"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths (404) and wrong methods (405) answer in OpenAI's shape too.
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        response = _error_response(APIError(exc.status_code, str(exc.detail), type=kind))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":
            name = loc[-1] if loc else "?"
            why = (
                "the defense is fixed by the server's policy for your API key"
                if name in _ENGINE_FIELDS
                else "this server does not support it"
            )
            message = f"unsupported parameter '{name}': {why}"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        return _error_response(APIError(400, message, param=param, code="invalid_parameter"))

    async def caller(request: Request) -> Caller:
        try:
            tier, ident = identify(state.policy, request.headers.get("authorization"))
        except AuthError as exc:
            raise APIError(401, str(exc), type="authentication_error", code="invalid_api_key") from None
        return Caller(tier=tier, ident=ident)

    async def rate_limited_caller(who: Caller = Depends(caller)) -> Caller:
        wait = state.limiter.admit(who.ident, who.tier.requests_per_minute)
        if wait is not None:
            state.metrics.requests.labels(who.tier.name, who.tier.defense.mode, "-", "rate_limited").inc()
            raise APIError(429, f"rate limit of {who.tier.requests_per_minute} requests per minute exceeded",
                           type="rate_limit_error", code="rate_limit_exceeded", retry_after=wait)
        return who

    @app.get("/health")
    async def health() -> JSONResponse:
        info = state.supervisor.health()
        return JSONResponse(info, status_code=200 if info["status"] == "ready" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        await state.supervisor.poll_fidelity()
        state.metrics.engine_up.set(1 if state.supervisor.status == "ready" else 0)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList)
    async def models(who: Caller = Depends(caller)) -> ModelList:
        return ModelList(data=[ModelCard(id=state.model_name)])

    @app.get("/v1/defense")
    async def defense(who: Caller = Depends(caller)) -> dict[str, Any]:
        return who.tier.public()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request, who: Caller = Depends(rate_limited_caller)):
        gen = _Generation(state, who, "chat", body, request)
        gen.check_common()
        if body.logprobs or body.top_logprobs is not None:
            gen.check_logprobs(body.top_logprobs or 0, "logprobs" if body.logprobs else "top_logprobs")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role,
                         "content": _check_text(m.text(), "messages")} for m in body.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        tokenizer = gen.tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            # transformers raises a ValueError deep in the handler; the caller's mistake is the endpoint.
            raise APIError(400, f"model {state.model_name!r} has no chat template; send a prompt to "
                                "/v1/completions instead", param="messages", code="chat_template_missing")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = gen.sampling_params(len(ids), max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        if body.stream:
            return gen.stream([ids], params, _chat_chunks)
        return await gen.respond([ids], params, _chat_response)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, who: Caller = Depends(rate_limited_caller)):
        gen = _Generation(state, who, "completions", body, request)
        gen.check_common()
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.logprobs is not None:
            gen.check_logprobs(body.logprobs, "logprobs")
            if body.echo:
                # Logprobs of echoed prompt tokens are vLLM prompt logprobs: raw teacher.
                raise APIError(400, "echo with logprobs is refused: prompt logprobs would describe the "
                               "undefended model", param="echo", code="logprobs_refused")
        prompts = gen.prompts(body.prompt)
        params = gen.sampling_params(max(len(p) for p in prompts), body.max_tokens, body.logprobs)
        if body.stream:
            return gen.stream(prompts, params, _completion_chunks)
        return await gen.respond(prompts, params, _completion_response)

    return app


class _Generation:
    """One generation request: validation, sampling parameters, engine calls, accounting."""

    def __init__(self, state: ServerState, who: Caller, endpoint: str, body: Any, request: Request) -> None:
        self.state = state
        self.who = who
        self.endpoint = endpoint
        self.body = body
        self.request = request
        self.mode = who.tier.defense.mode
        self.arrival = time.monotonic()
        self.id = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_lens: list[int] = []
        self.prompt_texts: list[str] = []

    def tokenizer(self) -> Any:
        tok = self.state.supervisor.tokenizer
        if tok is None:
            raise EngineUnavailable("engine starting")
        return tok

    def count(self, status: str) -> None:
        self.state.metrics.requests.labels(self.who.tier.name, self.mode, self.endpoint, status).inc()

    def check_common(self) -> None:
        body = self.body
        if body.model not in (None, "", self.state.model_name):
            self.count("rejected")
            raise APIError(404, f"model '{body.model}' does not exist; this server serves '{self.state.model_name}'",
                           param="model", code="model_not_found")
        if body.prompt_logprobs is not None:
            self.count("rejected")
            raise APIError(400, "prompt_logprobs is refused: vLLM computes them from the undefended model",
                           param="prompt_logprobs", code="logprobs_refused")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")

    def check_logprobs(self, k: int, param: str) -> None:
        refusal = self.who.tier.logprobs_refusal(k)
        if refusal is not None:
            self.count("rejected")
            code = "logprobs_refused" if not self.who.tier.allow_logprobs else None
            raise APIError(400, refusal, param=param, code=code)

    def prompts(self, prompt: Any) -> list[list[int]]:
        tok = self.tokenizer()
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [list(prompt)]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "prompt must not be empty", param="prompt")
        out = []
        vocab = len(tok)
        for item in items:
            if isinstance(item, str):
                ids = tok(_check_text(item, "prompt"))["input_ids"]
                self.prompt_texts.append(item)
            else:
                ids = list(item)
                if any(not 0 <= t < vocab for t in ids):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
                self.prompt_texts.append(tok.decode(ids))
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            out.append(ids)
        return out

    def sampling_params(self, prompt_len: int, max_tokens: int | None, logprobs: int | None) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        body = self.body
        room = self.state.max_model_len - prompt_len
        if room < 1:
            self.count("rejected")
            raise APIError(400, f"prompt is {prompt_len} tokens; the context is {self.state.max_model_len}",
                           param="messages" if self.endpoint == "chat" else "prompt", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            self.count("rejected")
            raise APIError(400, f"max_tokens {max_tokens} + prompt {prompt_len} exceeds the context of "
                           f"{self.state.max_model_len} tokens", param="max_tokens", code="context_length_exceeded")
        limit = max_tokens if max_tokens is not None else room
        if self.who.tier.max_tokens is not None:
            # A tier cap truncates (finish_reason "length") rather than failing the request.
            limit = min(limit, self.who.tier.max_tokens)
        from vllm.exceptions import VLLMClientError

        try:
            params = SamplingParams(
                n=body.n,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=body.seed,
                stop=[_check_text(x, "stop") for x in body.stop_list()] or None,
                max_tokens=limit,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                logprobs=logprobs,
                output_kind=RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY,
                # The only place a defense is chosen: from the caller's tier, never from the body.
                extra_args=self.who.tier.defense.extra_args(),
            )
        except (VLLMClientError, ValueError) as exc:
            # vLLM's own cross-field checks (e.g. n > 1 with greedy sampling) are the caller's error.
            self.count("rejected")
            raise APIError(400, str(exc), code="invalid_parameter") from None
        return params

    async def _run(self, prompts: list[list[int]], params: Any) -> AsyncIterator[tuple[int, Any]]:
        """Yield ``(prompt_index, RequestOutput)`` from one engine request per prompt, merged."""
        engine = self.state.supervisor.live_engine()
        self.prompt_lens = [len(p) for p in prompts]
        if len(prompts) == 1:
            async for out in engine.generate({"prompt_token_ids": prompts[0]}, params, f"{self.id}-0"):
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, ids: list[int]) -> None:
            try:
                async for out in engine.generate({"prompt_token_ids": ids}, params, f"{self.id}-{i}"):
                    await queue.put((i, out))
            except BaseException as exc:
                await queue.put((i, exc))
                raise
            finally:
                await queue.put((i, done))

        tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            # Cancelling the pumps aborts their engine requests.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _engine_error(self, exc: BaseException) -> APIError:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, VLLMClientError):
            return APIError(400, str(exc), code="invalid_parameter")
        if isinstance(exc, EngineUnavailable):
            return APIError(503, str(exc), type="service_unavailable", code="engine_unavailable")
        logger.warning("request %s failed in the engine: %s", self.id, type(exc).__name__)
        if isinstance(exc, EngineDeadError):
            # Flag it now rather than at the supervisor's next poll, so /health never lags a failed request.
            self.state.supervisor.mark_failed("engine core died during a step (requests in flight were failed, "
                                              "no tokens released)")
        # Fail closed: the defended step did not complete, so nothing of this request is released.
        return APIError(500, "the engine failed while producing this response; no output was released",
                        type="server_error", code="engine_failed")

    def _observe(self, first_token_at: float | None, n_tokens: int, finished_at: float) -> None:
        m = self.state.metrics
        if first_token_at is not None:
            m.ttft.labels(self.mode).observe(first_token_at - self.arrival)
            if n_tokens > 1:
                m.tpot.labels(self.mode).observe((finished_at - first_token_at) / (n_tokens - 1))
        m.generation_tokens.labels(self.who.tier.name, self.mode).inc(n_tokens)
        m.prompt_tokens.labels(self.who.tier.name, self.mode).inc(sum(self.prompt_lens))

    async def respond(self, prompts: list[list[int]], params: Any, build: Callable[..., Any]) -> JSONResponse:
        self.state.metrics.in_flight.inc()
        try:
            finals: dict[int, Any] = {}

            async def collect() -> None:
                async for i, out in self._run(prompts, params):
                    finals[i] = out

            task = asyncio.create_task(collect())
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await self.request.is_disconnected():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    self.count("aborted")
                    return JSONResponse({}, status_code=499)
            exc = task.exception()
            if exc is not None:
                error = self._engine_error(exc)
                self.count("error" if error.status >= 500 else "rejected")
                return _error_response(error)
            outs = [finals[i] for i in range(len(prompts))]
            n_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
            # FINAL_ONLY delivers no per-token events; the engine's own token timestamps stand in.
            first, last = _token_times(outs)
            self._observe(first, n_tokens, last or time.monotonic())
            self.count("ok")
            return JSONResponse(build(self, outs).model_dump())
        finally:
            self.state.metrics.in_flight.dec()

    def stream(self, prompts: list[list[int]], params: Any, chunks: Callable[..., Any]) -> StreamingResponse:
        # Fail before the 200 header if the engine cannot take the request.
        self.state.supervisor.live_engine()

        async def events() -> AsyncIterator[str]:
            self.state.metrics.in_flight.inc()
            first_at: float | None = None
            n_tokens = 0
            status = "aborted"
            started: set[tuple[int, int]] = set()
            try:
                async for i, out in self._run(prompts, params):
                    for c in out.outputs:
                        if c.token_ids and first_at is None:
                            first_at = time.monotonic()
                        n_tokens += len(c.token_ids)
                    for payload in chunks(self, i, out, started):
                        yield _sse(payload)
                if self.body.stream_options and self.body.stream_options.include_usage:
                    yield _sse(_usage_chunk(self, n_tokens))
                status = "ok"
                yield "data: [DONE]\n\n"
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except BaseException as exc:
                error = self._engine_error(exc)
                status = "error" if error.status >= 500 else "rejected"
                yield _sse(error.body.model_dump())
                yield "data: [DONE]\n\n"
            finally:
                self._observe(first_at, n_tokens, time.monotonic())
                self.count(status)
                self.state.metrics.in_flight.dec()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def token_str(self, token_id: int, decoded: str | None) -> str:
        if self.body.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        if decoded is None:
            return self.tokenizer().decode([token_id])
        return decoded


def _token_times(outs: list[Any]) -> tuple[float | None, float | None]:
    """First and last token times of finished outputs, on this host's monotonic clock.

    vLLM stamps them in the engine-core process with ``time.monotonic()``,
    which on Linux is one system-wide clock, so they compare with ours.
    """
    first = last = None
    for o in outs:
        stats = getattr(o, "metrics", None)
        f = getattr(stats, "first_token_ts", 0.0) or None
        l = getattr(stats, "last_token_ts", 0.0) or None
        if f is not None:
            first = f if first is None else min(first, f)
        if l is not None:
            last = l if last is None else max(last, l)
    return first, last


def _choice_index(gen: _Generation, prompt_index: int, output_index: int) -> int:
    return prompt_index * gen.body.n + output_index


def _chat_logprobs(gen: _Generation, c: Any, k: int) -> ChoiceLogprobs | None:
    if c.logprobs is None:
        return None
    content = []
    for token_id, position in zip(c.token_ids, c.logprobs):
        ranked = sorted(position.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))
        top = [
            TopLogprob(token=(s := gen.token_str(tid, lp.decoded_token)), logprob=_lp(lp.logprob),
                       bytes=list(s.encode("utf-8")))
            for tid, lp in ranked[:k]
        ]
        chosen = position[token_id]
        s = gen.token_str(token_id, chosen.decoded_token)
        content.append(ChatTokenLogprob(token=s, logprob=_lp(chosen.logprob), bytes=list(s.encode("utf-8")),
                                        top_logprobs=top))
    return ChoiceLogprobs(content=content)


def _usage(gen: _Generation, completion_tokens: int) -> Usage:
    prompt_tokens = sum(gen.prompt_lens)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def _usage_chunk(gen: _Generation, completion_tokens: int) -> Any:
    if gen.endpoint == "chat":
        return ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.state.model_name, choices=[],
                                   usage=_usage(gen, completion_tokens))
    return CompletionResponse(id=gen.id, created=gen.created, model=gen.state.model_name, choices=[],
                              usage=_usage(gen, completion_tokens))


def _chat_response(gen: _Generation, outs: list[Any]) -> ChatCompletionResponse:
    k = gen.body.top_logprobs or 0
    choices = []
    for i, o in enumerate(outs):
        for c in o.outputs:
            choices.append(ChatChoice(
                index=_choice_index(gen, i, c.index),
                message=ChatMessageOut(content=c.text),
                logprobs=_chat_logprobs(gen, c, k) if gen.body.logprobs else None,
                finish_reason=c.finish_reason,
            ))
    choices.sort(key=lambda ch: ch.index)
    n_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return ChatCompletionResponse(id=gen.id, created=gen.created, model=gen.state.model_name, choices=choices,
                                  usage=_usage(gen, n_tokens))


def _chat_chunks(gen: _Generation, i: int, out: Any, started: set[tuple[int, int]]) -> list[Any]:
    k = gen.body.top_logprobs or 0
    chunks = []
    for c in out.outputs:
        index = _choice_index(gen, i, c.index)
        if (i, c.index) not in started:
            started.add((i, c.index))
            chunks.append(ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.state.model_name,
                                              choices=[ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))]))
        if c.text or c.token_ids or c.finish_reason:
            chunks.append(ChatCompletionChunk(
                id=gen.id, created=gen.created, model=gen.state.model_name,
                choices=[ChatChunkChoice(
                    index=index,
                    delta=ChatDelta(content=c.text or None),
                    logprobs=_chat_logprobs(gen, c, k) if gen.body.logprobs and c.token_ids else None,
                    finish_reason=c.finish_reason,
                )],
            ))
    return chunks


def _completion_logprobs(gen: _Generation, c: Any, k: int, offset: int) -> CompletionLogprobs | None:
    if c.logprobs is None:
        return None
    result = CompletionLogprobs()
    for token_id, position in zip(c.token_ids, c.logprobs):
        chosen = position[token_id]
        s = gen.token_str(token_id, chosen.decoded_token)
        ranked = sorted(position.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))
        result.tokens.append(s)
        result.token_logprobs.append(_lp(chosen.logprob))
        result.top_logprobs.append({gen.token_str(tid, lp.decoded_token): _lp(lp.logprob) for tid, lp in ranked[:k]})
        result.text_offset.append(offset)
        offset += len(s)
    return result


def _completion_response(gen: _Generation, outs: list[Any]) -> CompletionResponse:
    k = gen.body.logprobs or 0
    choices = []
    for i, o in enumerate(outs):
        prefix = gen.prompt_texts[i] if gen.body.echo else ""
        for c in o.outputs:
            choices.append(CompletionChoice(
                index=_choice_index(gen, i, c.index),
                text=prefix + c.text,
                logprobs=_completion_logprobs(gen, c, k, len(prefix)) if gen.body.logprobs is not None else None,
                finish_reason=c.finish_reason,
            ))
    choices.sort(key=lambda ch: ch.index)
    n_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return CompletionResponse(id=gen.id, created=gen.created, model=gen.state.model_name, choices=choices,
                              usage=_usage(gen, n_tokens))


def _completion_chunks(gen: _Generation, i: int, out: Any, started: set[tuple[int, int]]) -> list[Any]:
    k = gen.body.logprobs or 0
    chunks = []
    for c in out.outputs:
        index = _choice_index(gen, i, c.index)
        text = c.text
        if (i, c.index) not in started:
            started.add((i, c.index))
            if gen.body.echo:
                text = gen.prompt_texts[i] + text
        if text or c.token_ids or c.finish_reason:
            chunks.append(CompletionResponse(
                id=gen.id, created=gen.created, model=gen.state.model_name,
                choices=[CompletionChoice(
                    index=index, text=text, finish_reason=c.finish_reason,
                    logprobs=_completion_logprobs(gen, c, k, 0) if gen.body.logprobs is not None and c.token_ids else None,
                )],
            ))
    return chunks
