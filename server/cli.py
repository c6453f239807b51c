"""``distillgame serve``: vLLM's own OpenAI server on the defended engine, with the policy in front.

It launches ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm
serve`` runs) with the engine's flags from :class:`~distillgame.engine.EngineConfig`
and :class:`~distillgame.server.gateway.DefensePolicy` as middleware, under
:class:`~distillgame.server.supervisor.ServerSupervisor`, which restarts it
after an engine failure. Ready when ``GET /health`` answers 200, which the
middleware gives only once the defense is verified live in every worker.
SIGTERM/SIGINT let in-flight requests finish for ``--drain-timeout`` seconds
(vLLM's ``--shutdown-timeout``).

Not for: the HTTP handlers (vLLM's app) or the policy's checks (``gateway``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distillgame.engine import EngineConfig
    from distillgame.server.policy import Policy
    from distillgame.server.supervisor import ServerCommand

logger = logging.getLogger(__name__)

# The default context is what the models support, capped here: the proxy's KV
# cache is allocated per request slot up front (--max-num-seqs x this many
# positions), so a model with 8k positions would otherwise take 4x the memory.
MAX_MODEL_LEN_CAP = 2048

# uvicorn closes idle keep-alive connections after 5 s by default. A client
# that pooled the connection can then send its next request on a socket the
# server is closing ("Server disconnected without sending a response"). The
# server must outlast its clients' idle time, as production proxies do
# (nginx 75 s, cloud load balancers 60 s in front of it).
KEEP_ALIVE_S = 75.0

# vLLM answers a request with `tools` and a named, "required" or "auto" tool
# choice only when a tool-call parser is configured (a 400 otherwise). The
# pythonic format needs no special tokens, so any teacher can be asked for it;
# a teacher whose template has its own format wants that format's parser.
DEFAULT_TOOL_PARSER = "pythonic"
# JSON without free whitespace for `response_format`, tools and
# `structured_outputs`: a grammar that allows any whitespace lets a small model
# spend its whole `max_tokens` on newlines (greedy SmolLM2-135M under PoE does).
# vLLM allows that switch only with a named backend: xgrammar, the one "auto"
# picks first and the only one that compiles the structural tags vLLM's tool
# parsers send for named and "required" tool choices.
# `-- --structured-outputs-config '{...}'` replaces it.
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}


def model_positions(model: str) -> int | None:
    """``max_position_embeddings`` of a model folder or hub id (None if its config does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    config = getattr(config, "get_text_config", lambda: config)()
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def default_max_model_len(teacher: str, proxy: str, cap: int = MAX_MODEL_LEN_CAP) -> int:
    """The longest context both models support, at most ``cap``."""
    limits = [n for n in (model_positions(teacher), model_positions(proxy)) if n]
    return min([cap, *limits])


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve defended completions over an OpenAI-compatible API")
    p.add_argument("--teacher", default=None, help="teacher model folder or id (default: embedded SmolLM2)")
    p.add_argument("--proxy", default=None, help="proxy model folder or id (default: embedded, first 10 layers)")
    p.add_argument("--ads-grad", default=None, help="proxy gradient file for ADS tiers (.safetensors)")
    p.add_argument("--ads-method", choices=["auto", "jvp", "fd"], default="auto",
                   help="ADS's proxy side: forward mode (jvp; auto for Llama-family proxies) or the "
                        "finite-difference copies theta +- eps g (fd)")
    p.add_argument("--proxy-runner", choices=["auto", "vllm", "transformers"], default="auto",
                   help="where PoE's proxy runs: on vLLM's layers with its KV in the engine's paged cache "
                        "(vllm; it then runs on every scheduled token, defended or not), beside the engine "
                        "on transformers (only for defended rows), or auto: vllm where vLLM has the proxy's "
                        "architecture and the policy has a PoE tier")
    p.add_argument("--no-shared-trunk", action="store_true",
                   help="on the vllm runner, run a proxy that is an early exit of the teacher as a model of its "
                        "own (its layers and KV) instead of on the teacher's trunk (for comparisons)")
    p.add_argument("--policy", default=None, type=Path,
                   help="policy file (.toml/.yaml): keys -> tiers -> defense; default: no auth, PoE for all")
    p.add_argument("--gamma", type=float, default=None,
                   help="PoE weight for the no-policy default (default: the embedded pair's gamma calibrated "
                        "to 0.25 nats/token; see docs/serving.md); ignored with --policy")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model id in /v1/models (default: teacher folder name)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help=f"longest prompt + completion in tokens (default: the positions both teacher and proxy "
                        f"support, at most {MAX_MODEL_LEN_CAP})")
    p.add_argument("--max-num-seqs", type=int, default=32, help="max concurrent sequences in the engine")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="vLLM's tensor parallelism: workers the teacher (and a proxy on vLLM's layers) is "
                        "sharded over; on CPUs each gets its own cores (VLLM_CPU_OMP_THREADS_BIND is set "
                        "for you unless you set it)")
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="vLLM's data parallelism: engine cores behind this one server, each a defended copy "
                        "of the teacher and proxy (readiness checks every worker of every core)")
    p.add_argument("--dtype", default="auto", help="teacher dtype (auto, float32, bfloat16, float16)")
    p.add_argument("--memory-share", type=float, default=0.3,
                   help="share of device (CPU: host) memory the engine may reserve")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="explicit KV-cache size in GiB (overrides the memory share for the KV cache)")
    p.add_argument("--proxy-cache-len", type=int, default=None,
                   help="positions per request slot allocated up front in the proxy's KV cache "
                        "(default: --max-model-len, so its memory is fixed at start; smaller values "
                        "grow on demand)")
    p.add_argument("--fault-file", default=None,
                   help="testing: while this file exists, every defended engine step fails")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to let requests finish on SIGTERM")
    p.add_argument("--max-body-mb", type=float, default=4.0,
                   help="largest request body in MiB; larger ones get 413 before they are read")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive (slow clients get 408)")
    p.add_argument("--keep-alive", type=float, default=KEEP_ALIVE_S,
                   help="seconds an idle keep-alive connection stays open; keep it above the idle "
                        "timeout of every client and proxy in front of the server")
    p.add_argument("--tool-call-parser", default=DEFAULT_TOOL_PARSER,
                   help="vLLM's tool-call parser for `tools` requests (vLLM answers named, required and auto "
                        "tool choices only with one): the one your teacher's chat template writes (hermes, "
                        f"llama3_json, ...); default {DEFAULT_TOOL_PARSER} (calls as a Python list, which a "
                        "template without a tool format can still be asked for); none: tools off")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="-- VLLM_FLAGS",
                   help="after --: more flags for vLLM's OpenAI server, e.g. -- --reasoning-parser deepseek_r1 "
                        "(the defense's own engine flags are set for you)")
    p.set_defaults(func=serve)


def engine_config(args: argparse.Namespace, policy: "Policy") -> "EngineConfig":
    """The engine ``serve`` starts for ``args`` and ``policy`` (no engine is started here)."""
    from distillgame import models
    from distillgame.engine import EngineConfig

    teacher, proxy = models.resolve(args.teacher, "teacher"), models.resolve(args.proxy, "proxy")
    if args.max_model_len is None:
        args.max_model_len = default_max_model_len(teacher, proxy)
        logger.info("max_model_len %d (what the teacher and proxy support, at most %d; --max-model-len sets it)",
                    args.max_model_len, MAX_MODEL_LEN_CAP)
    return EngineConfig(
        teacher=teacher, proxy=proxy, ads_grad=args.ads_grad, dtype=args.dtype,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, memory_share=args.memory_share,
        fault_file=args.fault_file, proxy_runner=args.proxy_runner,
        tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
        kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)) if args.kv_cache_gib else None,
        poe_served=any(tier.defense.mode == "poe" for tier in policy.tiers.values()),
        extra_defense={"ads_method": args.ads_method, **({"shared_trunk": False} if args.no_shared_trunk else {}),
                       **({"initial_cache_len": args.proxy_cache_len} if args.proxy_cache_len else {})},
    )


def serve(args: argparse.Namespace) -> int:
    """Run vLLM's OpenAI server on the defended engine, the policy in front, under :class:`ServerSupervisor`."""
    from distillgame.server.policy import DEFAULT_GAMMA, DEFAULT_KL_BUDGET, default_policy, load_policy
    from distillgame.server.supervisor import ServerSupervisor

    if args.policy is None:
        embedded = args.teacher in (None, "", "default") and args.proxy in (None, "", "default")
        if args.gamma is None and not embedded:
            logger.warning("gamma %g is calibrated for the embedded pair, not for this one; run "
                           "`distillgame bench calibrate` and pass --gamma or a --policy", DEFAULT_GAMMA)
        # The budget is shown only where it was measured: the default gamma on the embedded pair.
        budget = DEFAULT_KL_BUDGET if args.gamma is None and embedded else None
        policy = default_policy(DEFAULT_GAMMA if args.gamma is None else args.gamma, kl_budget=budget)
    else:
        policy = load_policy(args.policy)
    if args.ads_grad is None and any(t.defense.mode == "ads" for t in policy.tiers.values()):
        # Otherwise the first ADS request would fail inside the engine and take it down.
        logger.error("the policy has an ADS tier but no --ads-grad was given")
        return 2
    config = engine_config(args, policy)
    with tempfile.TemporaryDirectory(prefix="distillgame-serve-") as run_dir:
        command = server_command(args, config, policy, Path(run_dir))
        logger.info("serving on http://%s:%d (policy: %s): %s", args.host, args.port,
                    args.policy or "default PoE, no auth", shlex.join(command.argv))
        return ServerSupervisor(command).run()


def server_command(args: argparse.Namespace, config: "EngineConfig", policy: "Policy", run_dir: Path) -> "ServerCommand":
    """vLLM's OpenAI server with ``config``'s engine and :class:`DefensePolicy` for ``policy``, as one command."""
    from distillgame.server.gateway import BODY_TIMEOUT_ENV, DRAIN_FILE_ENV, MAX_BODY_MB_ENV
    from distillgame.server.policy import POLICY_ENV
    from distillgame.server.supervisor import ServerCommand

    if args.policy is not None:
        policy_file = Path(args.policy).resolve()
    else:
        # JSON is YAML: the no-policy default, written where the middleware reads policies from.
        policy_file = run_dir / "policy.yaml"
        policy_file.write_text(json.dumps(policy_document(policy)))
    config.disable_log_stats = False  # vLLM's own families on /metrics, beside distillgame_*
    name = args.served_model_name or Path(config.teacher or "").name or _default_name()
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", *config.server_args(),
        "--served-model-name", name, "--host", args.host, "--port", str(args.port),
        "--middleware", "distillgame.server.gateway.DefensePolicy",
        "--shutdown-timeout", str(int(math.ceil(args.drain_timeout))),
        "--disable-uvicorn-access-log",
        *tool_flags(args.tool_call_parser),
    ]
    passthrough = [a for i, a in enumerate(args.vllm_args or []) if not (i == 0 and a == "--")]
    if not any(a.startswith("--structured-outputs-config") for a in passthrough):
        argv += ["--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS)]
    argv += passthrough
    env = dict(os.environ)
    env.update({
        POLICY_ENV: str(policy_file),
        MAX_BODY_MB_ENV: str(args.max_body_mb),
        BODY_TIMEOUT_ENV: str(args.body_timeout),
        "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(int(math.ceil(args.keep_alive))),
        "TOKENIZERS_PARALLELISM": "false",
        **config.environment(),
    })
    drain_file = run_dir / "draining"
    env[DRAIN_FILE_ENV] = str(drain_file)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    return ServerCommand(argv=argv, env=env, health_url=f"http://{host}:{args.port}/health",
                         drain_file=str(drain_file), metrics_url=f"http://{host}:{args.port}/metrics",
                         drain_s=args.drain_timeout)


def tool_flags(parser: str | None) -> list[str]:
    """vLLM's flags for tool calling with ``parser`` (none for ``none``)."""
    if not parser or parser == "none":
        return []
    return ["--enable-auto-tool-choice", "--tool-call-parser", parser]


def policy_document(policy: "Policy") -> dict:
    """A policy file's content for a keyless policy (the no-policy default)."""
    tiers = {name: {"defense": tier.defense.model_dump(exclude_none=True), "kl_budget": tier.kl_budget}
             for name, tier in policy.tiers.items()}
    return {"tiers": tiers, "anonymous_tier": policy.anonymous_tier}


def _default_name() -> str:
    from distillgame import models

    return models.TEACHER_NAME


if __name__ == "__main__":  # pragma: no cover - the engine core is a spawned process
    from distillgame.cli import main

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(["serve", *sys.argv[1:]]))
