"""The defense policy as ASGI middleware on vLLM's own OpenAI server.

``vllm serve TEACHER --middleware distillgame.server.gateway.DefensePolicy``
(with ``DISTILLGAME_POLICY=policy.toml`` in the environment) puts the same
policy as ``distillgame serve --policy`` in front of vLLM's app: the same file,
the same key check, tiers, rate limits and body limits
(:mod:`distillgame.server.policy`, :mod:`distillgame.server.limits`), and errors
in OpenAI's shape. Per request it

- passes only an allowlist of routes (:data:`ROUTES`); every other path of
  vLLM's app (``/v1/responses``, ``/v1/messages``, pooling, ``/inference/v1/generate``,
  RL and dev routes, ...) is a 404, and WebSockets are closed;
- on the two generation routes, accepts only the request fields listed in
  :data:`CHAT_FIELDS` / :data:`COMPLETION_FIELDS` (engine fields such as
  ``vllm_xargs`` are refused and named, prompt logprobs and ``echo`` with
  logprobs too), caps ``max_tokens`` and top logprobs by tier, and writes the
  tier's defense into the body as flat ``vllm_xargs``, which vLLM's server
  carries to ``SamplingParams.extra_args`` for the defense processor
  (:func:`distillgame.plugins.mixing.parse_defense` reads that form);
- before the first defended request, asks the engine whether the defense is
  really on (``logprobs_mode == "processed_logprobs"``, the processor's config
  and a live processor in every worker); if not, defended tiers get a 503
  that says why, instead of the undefended teacher;
- answers ``/health`` 503 until the defense is verified live in every worker
  (then vLLM's own ``/health``, which says the engine is up): ready means
  defended, so a load balancer or ``distillgame serve``'s supervisor never
  routes to an engine that would serve undefended.

The body is re-serialized from the parsed object, so vLLM parses exactly what
was checked (no duplicate-key or parser differential gets past the checks);
bodies that are not strict JSON text (``NaN``, nesting deeper than the parser
takes, lone surrogate escapes, which no tokenizer can encode) are a 400 here.
Body limits come from ``$DISTILLGAME_MAX_BODY_MB`` and
``$DISTILLGAME_BODY_TIMEOUT_S`` (``distillgame serve``'s ``--max-body-mb`` and
``--body-timeout``), since ``vllm serve`` passes the middleware no arguments.

``distillgame serve`` runs vLLM's server with this middleware and these
environment variables set from its flags.

Not for: generation (vLLM's server does it) or the defense math (``plugins``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from typing import Any

from distillgame.server.limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    BodyLimitMiddleware,
    ErrorShieldMiddleware,
    Message,
    Receive,
    Scope,
    Send,
    send_error,
)
from distillgame.server.metrics import ServerMetrics
from distillgame.server.policy import ENGINE_FIELDS, AuthError, Policy, RateLimiter, Tier, identify, policy_from_env

logger = logging.getLogger(__name__)

MAX_STOP = 16  # stop strings per request
MAX_N = 16  # choices per request

# The middleware's body limits, read when vllm serve constructs it (it passes no arguments).
MAX_BODY_MB_ENV = "DISTILLGAME_MAX_BODY_MB"
# While this file exists, the server is draining: new generation requests get 503, in-flight ones finish.
DRAIN_FILE_ENV = "DISTILLGAME_DRAIN_FILE"
BODY_TIMEOUT_ENV = "DISTILLGAME_BODY_TIMEOUT_S"

HEALTH = "/health"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
DEFENSE = "/v1/defense"
# Path -> methods. Everything else on vLLM's app is answered 404 here. Not
# /v1/responses: it stores responses under ids any caller may fetch or continue
# from (GET /v1/responses/{id}, previous_response_id), runs in the background
# and calls tool servers, none of which the policy's keys scope; see docs/vllm-serve.md.
ROUTES: dict[str, frozenset[str]] = {
    "/v1/models": frozenset({"GET"}),
    CHAT: frozenset({"POST"}),
    COMPLETIONS: frozenset({"POST"}),
    "/tokenize": frozenset({"POST"}),
    "/detokenize": frozenset({"POST"}),
    "/health": frozenset({"GET"}),
    "/metrics": frozenset({"GET"}),
    DEFENSE: frozenset({"GET"}),
}
# Served without a key, as by `distillgame serve`: liveness and counters carry no model output.
PUBLIC = frozenset({"/health", "/metrics"})

# Request fields passed to vLLM, per generation route. An allowlist, so a field
# a later vLLM adds (as 0.32 added logprob_token_ids, which returns logprobs of
# any token ids the caller names) is refused until someone has looked at it.
_SAMPLING_FIELDS = frozenset({
    "model", "n", "stream", "stream_options", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
    "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "user", "max_tokens", "ignore_eos",
    "min_tokens", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
    "return_tokens_as_token_ids", "return_token_ids", "response_format", "structured_outputs",
    "truncate_prompt_tokens", "add_special_tokens", "echo", "logprobs",
    # Named so the refusal below can say exactly why.
    "prompt_logprobs",
})
CHAT_FIELDS = _SAMPLING_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "reasoning_effort", "include_reasoning", "chat_template_kwargs", "add_generation_prompt",
    "continue_final_message",
}
COMPLETION_FIELDS = _SAMPLING_FIELDS | {"prompt", "suffix"}
# vLLM's default max_tokens for /v1/completions when the field is absent (OpenAI's too).
_COMPLETION_DEFAULT_MAX_TOKENS = 16


class GatewayError(Exception):
    """A refusal answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    async def send(self, send: Send) -> None:
        headers = [(b"retry-after", str(self.retry_after).encode())] if self.retry_after is not None else None
        await send_error(send, self.status, self.message, type=self.type, code=self.code, param=self.param,
                         headers=headers)


class DefensePolicy:
    """Pure-ASGI middleware: the policy file decides the defense of every request to vLLM's app.

    ``vllm serve --middleware`` constructs it with the app alone; the policy
    then comes from ``$DISTILLGAME_POLICY`` (unset: the no-policy default of
    ``distillgame serve``, anonymous PoE), the body limits from
    :data:`MAX_BODY_MB_ENV` and :data:`BODY_TIMEOUT_ENV`, and a bad file or
    value stops the server at start.
    """

    def __init__(self, app: Any, policy: Policy | None = None, *, max_body_bytes: int | None = None,
                 body_timeout_s: float | None = None, metrics: ServerMetrics | None = None) -> None:
        self.app = app
        self.policy = policy if policy is not None else policy_from_env()
        if max_body_bytes is None:
            max_body_bytes = int(_positive_env(MAX_BODY_MB_ENV, DEFAULT_MAX_BODY_BYTES / (1 << 20)) * (1 << 20))
        if body_timeout_s is None:
            body_timeout_s = _positive_env(BODY_TIMEOUT_ENV, DEFAULT_BODY_TIMEOUT_S)
        self.limiter = RateLimiter()
        self.metrics = metrics if metrics is not None else _shared_metrics()
        # Bodies are read (and refused when too big or too slow) before anything parses them.
        self._generation = BodyLimitMiddleware(self._generate, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
        self._other = BodyLimitMiddleware(self.app, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
        # An unexpected exception here or below is a 500 in OpenAI's shape, its text (which can quote the prompt) unlogged.
        self._shielded = ErrorShieldMiddleware(self._dispatch)
        self._engine_ok = False
        self._engine_refusal: str | None = None
        self._workers: list[dict[str, Any]] = []  # the statuses that passed the check
        self._engine_lock = asyncio.Lock()
        logger.info("defense policy on vLLM's server: tiers %s; routes %s",
                    {name: tier.defense.mode for name, tier in self.policy.tiers.items()}, sorted(ROUTES))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            # vLLM's realtime routes are WebSockets; none is on the allowlist. Closing before accept is a 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        await self._shielded(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope.get("path", ""), scope.get("method", "")
        try:
            methods = ROUTES.get(path)
            if methods is None:
                raise GatewayError(404, f"no route {path!r} on this server", type="not_found_error",
                                   code="not_found")
            if method not in methods:
                raise GatewayError(405, f"method {method} is not allowed on {path}", code="method_not_allowed")
            if path == HEALTH:
                await self._health(scope, receive, send)
                return
            if path in PUBLIC:
                if path == "/metrics":
                    await self._poll_fidelity(scope)
                await self.app(scope, receive, send)
                return
            tier, ident = self._identify(scope)
            if path == DEFENSE:
                await _send_json(send, 200, tier.public())
                return
            if path in (CHAT, COMPLETIONS):
                drain = os.environ.get(DRAIN_FILE_ENV)
                if drain and os.path.exists(drain):
                    raise GatewayError(503, "the server is shutting down; retry on another replica",
                                       type="service_unavailable", code="draining", retry_after=1)
                scope = {**scope, "distillgame": (tier, ident)}
                await self._generation(scope, receive, send)
                return
            await self._other(scope, receive, send)
        except GatewayError as exc:
            await exc.send(send)

    def _identify(self, scope: Scope) -> tuple[Tier, str]:
        try:
            return identify(self.policy, _header(scope, b"authorization"))
        except AuthError as exc:
            raise GatewayError(401, str(exc), type="authentication_error", code="invalid_api_key") from None

    async def _generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A generation request whose body has arrived within the limits: check, rewrite, pass on."""
        tier, ident = scope["distillgame"]
        endpoint = "chat" if scope["path"] == CHAT else "completions"
        requests = self.metrics.requests
        try:
            wait = self.limiter.admit(ident, tier.requests_per_minute)
            if wait is not None:
                requests.labels(tier.name, tier.defense.mode, "-", "rate_limited").inc()
                raise GatewayError(429, f"rate limit of {tier.requests_per_minute} requests per minute exceeded",
                                   type="rate_limit_error", code="rate_limit_exceeded", retry_after=wait)
            message = await receive()
            body = _parse_body(message.get("body", b""))
            body = (_check_chat if endpoint == "chat" else _check_completion)(body, tier)
            if tier.defended:
                refusal = await self._engine_check(scope)
                if refusal is None and tier.defense.mode == "ads":
                    refusal = ads_refusal(scope["app"].state.engine_client)
                if refusal is not None:
                    raise GatewayError(503, f"the defense is not live on this engine, so defended tiers are not "
                                       f"served: {refusal}", type="service_unavailable", code="defense_not_live")
        except GatewayError as exc:
            if exc.status != 429:
                requests.labels(tier.name, tier.defense.mode, endpoint,
                                "error" if exc.status >= 500 else "rejected").inc()
            await exc.send(send)
            return
        raw = _encode_body(body)
        # The body is now whole and re-encoded: its framing headers describe the old one.
        headers = [(k, v) for k, v in scope.get("headers", ()) if k not in (b"content-length", b"transfer-encoding")]
        headers.append((b"content-length", str(len(raw)).encode()))
        inner = {k: v for k, v in scope.items() if k != "distillgame"}
        inner["headers"] = headers
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        status = 500

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(inner, replay, observe)
        finally:
            self.metrics.in_flight.dec()
            outcome = "ok" if status < 400 else "rejected" if status < 500 else "error"
            requests.labels(tier.name, tier.defense.mode, endpoint, outcome).inc()

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Ready means defended: 200 only once every tier of the policy can be served with its defense.

        vLLM's own ``/health`` (asked last) says the engine is up; before
        that, each defended tier's defense must be verified live in every
        worker (:func:`engine_refusal`, and an ADS gradient for ADS tiers).
        """
        refusal = None
        modes = {tier.defense.mode for tier in self.policy.tiers.values()}
        if modes - {"none"}:
            refusal = await self._engine_check(scope)
        if refusal is None and "ads" in modes:
            refusal = ads_refusal(getattr(getattr(scope.get("app"), "state", None), "engine_client", None))
        if refusal is not None:
            await send_error(send, 503, f"not ready: {refusal}", type="service_unavailable", code="defense_not_live")
            return
        status = 500

        async def status_only(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self.app(scope, receive, status_only)
        if status != 200:
            await send_error(send, 503, "not ready: the engine is not healthy", type="service_unavailable",
                             code="engine_unavailable")
            return
        ready: dict[str, Any] = {"status": "ready", "defended_tiers": sorted(
            name for name, tier in self.policy.tiers.items() if tier.defended)}
        if self._workers:  # checked live: how many workers, in how many engine cores
            ready |= {"workers": len(self._workers), "engine_cores": _engine_cores(self._workers)}
        await _send_json(send, 200, ready)

    async def _engine_check(self, scope: Scope) -> str | None:
        """Why the engine would serve defended tiers undefended, or None; a settled answer is kept."""
        if self._engine_ok:
            return None
        if self._engine_refusal is not None:
            return self._engine_refusal
        async with self._engine_lock:
            if self._engine_ok or self._engine_refusal is not None:
                return self._engine_refusal
            engine = getattr(getattr(scope.get("app"), "state", None), "engine_client", None)
            if engine is None:
                return "the engine is not up yet"
            workers: list[dict[str, Any]] = []
            refusal = await engine_refusal(engine, workers)
            if refusal is None:
                self._engine_ok = True
                self._workers = workers
                logger.info("defense checked live on every worker (%d workers in %d engine cores); defended tiers "
                            "are served", len(workers), _engine_cores(workers))
            elif refusal != _ENGINE_UNREACHABLE:
                # The engine's settings do not change while it runs: ask once.
                self._engine_refusal = refusal
                logger.error("defended tiers refused: %s", refusal)
            return refusal

    async def _poll_fidelity(self, scope: Scope) -> None:
        """Fold the processor's cumulative fidelity counters into ours before /metrics renders them."""
        if not self._engine_ok:
            return
        engine = getattr(getattr(scope.get("app"), "state", None), "engine_client", None)
        if engine is None:
            return
        from distillgame.plugins.processor import fidelity_rpc

        try:
            per_worker = await every_worker(engine, fidelity_rpc)
        except Exception as exc:
            logger.warning("fidelity poll failed: %s", type(exc).__name__)
            return
        totals: dict[str, dict[str, float]] = {}
        for worker in per_worker:
            for mode, counts in worker.items():
                into = totals.setdefault(mode, {})
                for key, value in counts.items():
                    into[key] = into.get(key, 0.0) + float(value)
        self.metrics.record_fidelity(totals, engine_id=id(engine))


_ENGINE_UNREACHABLE = "the engine did not answer the defense's status call"


async def every_worker(engine: Any, method: str) -> list[Any]:
    """``method``'s answer from every worker of every engine core behind ``engine``, in one list.

    ``engine.collective_rpc`` asks every worker of one engine core. Under data
    parallelism (``--data-parallel-size``) the server's client sends it to every
    core but returns the first core's answer only (vLLM 0.32's
    ``DPLBAsyncMPClient.call_utility_async``), which would let a replica
    without a live processor pass the readiness check and leave its tokens out
    of the fidelity counters; so the call goes to each core here.
    """
    call_all = getattr(getattr(engine, "engine_core", None), "call_utility_all_async", None)
    if call_all is None:
        return list(await engine.collective_rpc(method))
    per_core = await call_all("collective_rpc", method, None, (), None)
    return [worker for workers in per_core for worker in workers]


def _engine_cores(statuses: list[dict[str, Any]]) -> int:
    return len({status.get("dp_rank", 0) for status in statuses})


async def engine_refusal(engine: Any, statuses_out: list[dict[str, Any]] | None = None) -> str | None:
    """Why ``engine`` (vLLM's ``EngineClient``) would release an undefended distribution, or None.

    Checks what no request can see: ``logprobs_mode`` (the default,
    ``raw_logprobs``, returns the teacher's logprobs from before the
    processor ran) and, through :func:`every_worker`, that every worker built a
    live defense processor and runs without async scheduling
    (:meth:`~distillgame.plugins.processor.DefenseWorkerExtension.distillgame_status`,
    judged by :func:`distillgame.engine.verify_defense_live`). The statuses
    reported are appended to ``statuses_out``.
    """
    from distillgame.engine import DefenseNotLive, verify_defense_live
    from distillgame.plugins.processor import status_rpc

    model_config = getattr(getattr(engine, "vllm_config", None), "model_config", None)
    mode = str(getattr(model_config, "logprobs_mode", "unknown"))
    if mode != "processed_logprobs":
        return (f"the engine runs with logprobs_mode {mode!r}, so logprobs would describe the teacher before "
                "the defense; start it with --logprobs-mode processed_logprobs")
    try:
        statuses = await every_worker(engine, status_rpc)
    except Exception as exc:
        if type(exc).__name__ == "EngineDeadError":
            return _ENGINE_UNREACHABLE
        logger.warning("%s failed: %s", status_rpc, type(exc).__name__)
        return (f"the engine's workers cannot report the defense's status ({type(exc).__name__}); start it with "
                "--worker-extension-cls distillgame.plugins.processor.DefenseWorkerExtension")
    if statuses_out is not None:
        statuses_out.extend(statuses)
    try:
        verify_defense_live(list(statuses))
    except DefenseNotLive as exc:
        return str(exc)
    if any(status.get("async_scheduling") for status in statuses):
        return "async scheduling is on; start the engine with --no-async-scheduling"
    return None


def ads_refusal(engine: Any) -> str | None:
    """Why ``engine`` cannot serve ADS, or None.

    Without a gradient the processor fails the step of any ADS request, and a
    failed step ends vLLM's engine, so one caller of an ADS tier would stop the
    server; ``distillgame serve`` refuses such a policy at start instead.
    """
    extra = getattr(getattr(engine, "vllm_config", None), "additional_config", None) or {}
    section = extra.get("distillgame") if isinstance(extra, dict) else None
    if not isinstance(section, dict) or not section.get("ads_grad"):
        return ("the engine has no ADS gradient (additional_config['distillgame']['ads_grad']), so ADS tiers "
                "are not served")
    return None


def _positive_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < math.inf:
        raise ValueError(f"${name} must be a positive number, got {raw!r}")
    return value


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is outside a float's range")
    return value


def _parse_body(raw: bytes) -> dict[str, Any]:
    try:
        # NaN and Infinity are Python's extensions, not JSON, and 1e999 would parse as one:
        # vLLM's models would take them as floats.
        body = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
    except ValueError:
        raise GatewayError(400, "the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise GatewayError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object", code="invalid_json")
    _encode_body(body)
    return body


def _encode_body(body: dict[str, Any]) -> bytes:
    """The body vLLM will parse, as UTF-8 JSON; a 400 naming the field for a string that is not Unicode text."""
    try:
        return json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        # JSON can carry a lone surrogate escape ("\ud800"); a tokenizer cannot encode it.
        param = _lone_surrogate_at(body)
        raise GatewayError(400, f"{param or 'the body'} is not valid Unicode text (lone surrogate escape)",
                           param=param, code="invalid_text") from None
    except RecursionError:
        raise GatewayError(400, "the request body is nested too deeply", code="invalid_json") from None


def _lone_surrogate_at(body: dict[str, Any]) -> str | None:
    """The top-level field whose value (or name) holds a string that is not Unicode text."""
    for name, value in body.items():
        stack: list[Any] = [name, value]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return name.encode("utf-8", "replace").decode("utf-8")
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
    return None


def _check_fields(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for name in body:
        if name in ENGINE_FIELDS:
            raise GatewayError(400, f"unsupported parameter '{name}': the defense is fixed by the server's policy "
                               "for your API key", param=name, code="invalid_parameter")
        if name not in allowed:
            raise GatewayError(400, f"unsupported parameter '{name}': this server does not serve it under a "
                               "defense", param=name, code="invalid_parameter")
    if body.get("prompt_logprobs") is not None:
        raise GatewayError(400, "prompt_logprobs is refused: vLLM computes them from the undefended model",
                           param="prompt_logprobs", code="logprobs_refused")


def _integer(body: dict[str, Any], name: str) -> int | None:
    """A field the policy caps: a JSON integer or absent. vLLM's models would coerce "25" or 25.0 past a cap."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise GatewayError(400, f"{name} must be an integer", param=name, code="invalid_parameter")
    return value


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise GatewayError(400, f"{name} must be a boolean", param=name, code="invalid_parameter")
    return value


def _check_common(body: dict[str, Any], tier: Tier, logprobs: int | None, logprobs_param: str) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        _integer(body, name)
    n = _integer(body, "n")
    if n is not None and n > MAX_N:
        raise GatewayError(400, f"n must be at most {MAX_N}", param="n", code="invalid_parameter")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise GatewayError(400, f"at most {MAX_STOP} stop strings", param="stop", code="invalid_parameter")
    if logprobs is not None:
        refusal = tier.logprobs_refusal(logprobs)
        if refusal is not None:
            raise GatewayError(400, refusal, param=logprobs_param,
                               code="logprobs_refused" if not tier.allow_logprobs else "invalid_parameter")
        if _boolean(body, "echo"):
            # vLLM turns echo + logprobs into prompt logprobs: the raw teacher's.
            raise GatewayError(400, "echo with logprobs is refused: prompt logprobs would describe the undefended "
                               "model", param="echo", code="logprobs_refused")
    _boolean(body, "echo")
    # The only place the defense is chosen: from the caller's tier, never from the body.
    body["vllm_xargs"] = tier.defense.vllm_xargs()


def _check_chat(body: dict[str, Any], tier: Tier) -> dict[str, Any]:
    _check_fields(body, CHAT_FIELDS)
    top = _integer(body, "top_logprobs")
    wants = _boolean(body, "logprobs") or top is not None
    _check_common(body, tier, (top or 0) if wants else None, "logprobs" if body.get("logprobs") else "top_logprobs")
    if tier.max_tokens is not None:
        requested = [v for v in (_integer(body, "max_tokens"), _integer(body, "max_completion_tokens")) if v is not None]
        # vLLM takes max_completion_tokens, else max_tokens: cap both so neither gets past.
        for name in ("max_tokens", "max_completion_tokens"):
            if body.get(name) is not None:
                body[name] = min(body[name], tier.max_tokens)
        if not requested:
            body["max_tokens"] = tier.max_tokens
    return body


def _check_completion(body: dict[str, Any], tier: Tier) -> dict[str, Any]:
    _check_fields(body, COMPLETION_FIELDS)
    _check_common(body, tier, _integer(body, "logprobs"), "logprobs")
    if tier.max_tokens is not None:
        requested = _integer(body, "max_tokens")
        if "max_tokens" not in body:
            requested = _COMPLETION_DEFAULT_MAX_TOKENS
        body["max_tokens"] = tier.max_tokens if requested is None else min(requested, tier.max_tokens)
    return body


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def _send_json(send: Send, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


_METRICS: ServerMetrics | None = None


def _shared_metrics() -> ServerMetrics:
    """One set of counters per process, shown on vLLM's own /metrics beside its families."""
    global _METRICS
    if _METRICS is None:
        _METRICS = ServerMetrics()
        try:
            from vllm.v1.metrics.prometheus import get_prometheus_registry

            registry = get_prometheus_registry()
            m = _METRICS
            for family in (m.requests, m.in_flight, m.fidelity_tokens, m.fidelity_kl, m.fidelity_agree,
                           m.fidelity_kl_per_token, m.fidelity_argmax_agreement):
                registry.register(family)
        except (ImportError, ValueError) as exc:
            logger.warning("distillgame metrics not added to vLLM's registry: %s", exc)
    return _METRICS
