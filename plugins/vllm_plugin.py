"""The package's ``vllm.general_plugins`` entry point: every defended engine, whoever builds it.

vLLM loads general plugins in every process it runs (the API server, the
engine core, each worker), and ``EngineArgs`` loads them before it builds an
engine's configuration. :func:`register` uses that to

- register the defended model class (:mod:`distillgame.plugins.paged_proxy`);
- guard ``EngineArgs.create_engine_config``: when the engine's
  ``additional_config`` carries a ``distillgame`` section, the arguments the
  defense needs are set before vLLM builds the configuration, and settings under
  which it would not run are refused with a message naming the flag.

So ``vllm serve TEACHER --additional-config '{"distillgame": {"proxy": P}}'``,
``vllm.LLM(..., additional_config=...)`` and ``distillgame serve`` get the same
engine. What is set for the caller (:func:`apply_defense_arguments`):

| engine argument | set to | why |
| --- | --- | --- |
| ``logprobs_mode`` | ``processed_logprobs`` (``processed_logits`` for ``raw_logits``) | the raw modes report the teacher before the mix |
| ``async_scheduling`` | ``False`` where left unset | output-token lists hold placeholders under it |
| ``worker_extension_cls`` | :class:`~distillgame.plugins.processor.DefenseWorkerExtension` where unset | the status and fidelity RPCs |
| ``hf_overrides`` | the paged proxy (:func:`proxy_overrides`) where unset | PoE's proxy on vLLM's layers and paged KV |
| ``$VLLM_USE_V2_MODEL_RUNNER`` | ``0`` where unset | the processor implements the V1 runner's interface |

What is refused (:class:`DefenseConfigError`, raised before any model loads):
``--async-scheduling``, ``--pipeline-parallel-size`` above 1, ``VLLM_USE_V2_MODEL_RUNNER=1``, another
``--worker-extension-cls``, ``--enable-prompt-embeds``, and any speculative
decoding (vLLM builds no custom logits processor under it: the defense would
silently not run), including a speculator model that vLLM detects by itself.

Not for: the defense itself (:mod:`distillgame.plugins.processor`) or a
launcher's sizes and ports (:mod:`distillgame.engine`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# A child of vLLM's logger, so that what the plugin sets shows in the server's log beside vLLM's own lines
# (vLLM configures handlers for "vllm" only).
logger = logging.getLogger("vllm.distillgame")

SECTION = "distillgame"
WORKER_EXTENSION = "distillgame.plugins.processor.DefenseWorkerExtension"
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
_PROCESSED = {"raw_logprobs": "processed_logprobs", "raw_logits": "processed_logits"}
_GUARDED = "_distillgame_guarded"


class DefenseConfigError(ValueError):
    """An engine configured for the defense with a setting under which the defense would not run."""


def register() -> None:
    """Entry point: the defended model class, and the guard on every engine configuration."""
    from distillgame.plugins import paged_proxy

    paged_proxy.register()
    install_guard()


def install_guard() -> None:
    """Wrap ``EngineArgs.create_engine_config`` once per process (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _GUARDED, False):
        return

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> "VllmConfig":
        section = defense_section_of(self.additional_config)
        if section is not None:
            apply_defense_arguments(self, section)
        config = original(self, *args, **kwargs)
        if section is not None:
            refuse_built_config(config)
        return config

    setattr(create_engine_config, _GUARDED, True)
    create_engine_config.__doc__ = original.__doc__
    EngineArgs.create_engine_config = create_engine_config


def defense_section_of(additional_config: Any) -> dict[str, Any] | None:
    """The ``distillgame`` section of an engine's ``additional_config`` (a dict or its JSON text), or None."""
    if isinstance(additional_config, str):
        try:
            additional_config = json.loads(additional_config)
        except ValueError:
            return None
    if not isinstance(additional_config, dict) or SECTION not in additional_config:
        return None
    section = additional_config[SECTION]
    if not isinstance(section, dict):
        raise DefenseConfigError("additional_config['distillgame'] must be an object with a 'proxy' folder or id")
    return section


def apply_defense_arguments(args: Any, section: dict[str, Any]) -> None:
    """Set on ``args`` (vLLM's ``EngineArgs``) what the defense needs; refuse what it cannot run under."""
    from distillgame.plugins.processor import DefenseSettings

    settings = DefenseSettings.from_section(section)
    if args.async_scheduling:
        raise DefenseConfigError("the defense does not run under async scheduling (its output-token lists would "
                                 "hold placeholders): remove --async-scheduling (async_scheduling=True)")
    args.async_scheduling = False
    if args.speculative_config:
        raise DefenseConfigError("the defense does not run with speculative decoding (vLLM then builds no custom "
                                 "logits processor, so requests would be served undefended): remove "
                                 "--speculative-config (speculative_config=...)")
    if int(getattr(args, "pipeline_parallel_size", 1) or 1) > 1:
        raise DefenseConfigError(
            "the defense does not run under pipeline parallelism: the mix needs the teacher's logits and the "
            "proxy's on one stage (the last, which alone holds the logits), and the defended model class does not "
            "implement vLLM's SupportsPP, so no stage could mix: remove --pipeline-parallel-size "
            "(pipeline_parallel_size) and shard with --tensor-parallel-size")
    if getattr(args, "enable_prompt_embeds", False):
        raise DefenseConfigError("the defense needs token ids: remove --enable-prompt-embeds")
    if os.environ.get(V2_RUNNER_ENV, "0") not in ("0", ""):
        raise DefenseConfigError(f"the defense runs on vLLM's V1 model runner only: unset {V2_RUNNER_ENV} or "
                                 f"set it to 0 (it is {os.environ[V2_RUNNER_ENV]!r})")
    os.environ[V2_RUNNER_ENV] = "0"
    mode = str(args.logprobs_mode)
    if mode in _PROCESSED:
        logger.info("logprobs_mode %s -> %s: returned logprobs describe the released distribution", mode,
                    _PROCESSED[mode])
        args.logprobs_mode = _PROCESSED[mode]
    extension = args.worker_extension_cls
    if extension and extension != WORKER_EXTENSION:
        raise DefenseConfigError(f"the defense needs --worker-extension-cls {WORKER_EXTENSION} (its status and "
                                 f"fidelity calls); this engine names {extension!r}")
    args.worker_extension_cls = WORKER_EXTENSION
    logger.info("defended engine (proxy %s): async scheduling off, worker extension %s, V1 model runner",
                settings.proxy, WORKER_EXTENSION)
    if not args.hf_overrides:
        overrides = proxy_overrides(args.model, settings.proxy, settings.proxy_runner)
        if overrides:
            args.hf_overrides = overrides


def refuse_built_config(config: "VllmConfig") -> None:
    """Refuse what vLLM decided while building the configuration (a speculator checkpoint, async scheduling)."""
    if config.speculative_config is not None:
        raise DefenseConfigError("the defense does not run with speculative decoding, and vLLM enabled it for this "
                                 "model (a speculator checkpoint or --speculative-config): serve the target model "
                                 "without it")
    if config.scheduler_config.async_scheduling:
        raise DefenseConfigError("the defense does not run under async scheduling: add --no-async-scheduling")


def proxy_overrides(teacher: str, proxy: str, runner: str, poe_served: bool = True) -> dict[str, Any] | None:
    """The ``hf_overrides`` that put PoE's proxy on vLLM's layers, or None to keep it beside the engine.

    ``runner``: ``"vllm"`` (required; an error where vLLM has no class for the
    proxy), ``"transformers"`` (None), or ``"auto"``: vLLM's layers where it
    has the proxy's architecture and PoE is served (``poe_served``; ADS needs
    forward-mode tangents that vLLM's attention kernels do not carry).
    """
    if runner not in ("auto", "vllm", "transformers"):
        raise ValueError(f"proxy_runner must be 'auto', 'vllm' or 'transformers', not {runner!r}")
    if runner == "transformers":
        return None
    if runner == "auto" and not poe_served:
        logger.info("the proxy runs on transformers beside the engine: no PoE is served, and ADS needs "
                    "forward-mode tangents that vLLM's attention kernels do not carry")
        return None
    from transformers import AutoConfig

    from distillgame.plugins import paged_proxy

    reason = paged_proxy.unsupported_reason(getattr(AutoConfig.from_pretrained(proxy), "architectures", None))
    if reason is not None:
        if runner == "vllm":
            raise ValueError(f"proxy_runner 'vllm': the proxy cannot run on vLLM's layers: {reason}")
        logger.info("the proxy runs on transformers beside the engine: %s", reason)
        return None
    logger.info("the proxy runs on vLLM's layers, its KV in the engine's paged cache")
    return paged_proxy.hf_overrides(AutoConfig.from_pretrained(teacher).architectures)
