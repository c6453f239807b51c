"""How a defended vLLM engine is configured: one place for every launcher.

The defense processor is registered under vLLM's ``vllm.logits_processors``
entry-point group, so every engine in this environment loads it by itself. It
stays inert unless the engine's ``additional_config`` carries a ``distillgame``
section, which this module builds. The processor must never also be passed via
``logits_processors=`` (vLLM would apply it twice), so nothing here does.

Not for: serving or HTTP (see ``distillgame.server``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from distillgame import models

logger = logging.getLogger(__name__)


def prepare_environment() -> None:
    """Select the model runner whose logits-processor interface we implement.

    vLLM 0.32 defaults to Model Runner V2 on GPUs, which has a different
    processor interface; the V1 runner (the CPU default) is the tested path.
    The package's vLLM plugin sets the same for any defended engine; setting
    it here first keeps processes that import vLLM's runner early consistent.
    """
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


@dataclass
class EngineConfig:
    """Engine-wide settings for a defended engine (teacher + proxy)."""

    teacher: str | None = None
    proxy: str | None = None
    ads_grad: str | None = None
    dtype: str = "auto"
    proxy_dtype: str | None = None
    max_model_len: int = 2048
    max_num_seqs: int = 32
    memory_share: float = 0.3
    enforce_eager: bool = True
    seed: int = 0
    num_gpu_blocks_override: int | None = None
    # Sizes the KV cache directly (vLLM's kv_cache_memory_bytes) instead of from
    # memory_share minus what the worker already holds; on CPUs the latter goes
    # negative for a float32 pair at a small share.
    kv_cache_bytes: int | None = None
    disable_log_stats: bool = True
    fault_file: str | None = None
    extra_defense: dict[str, Any] = field(default_factory=dict)
    # Where PoE's proxy runs: "vllm" (one vLLM model with the teacher, its KV
    # in the engine's paged cache: distillgame.plugins.paged_proxy),
    # "transformers" (beside the engine, dense KV per slot), or "auto": vllm
    # where vLLM has a model class for the proxy's architecture.
    proxy_runner: str = "auto"
    # False where no request can ask this engine for PoE (the server knows from
    # its policy). auto then keeps the proxy beside the engine, where only ADS
    # uses it, rather than running its layers on every scheduled token.
    poe_served: bool = True
    # vLLM's tensor parallelism: the teacher's layers (and, on the vllm runner, the
    # proxy's) sharded over this many workers. On CPUs each worker gets its own
    # cores (see environment()).
    tensor_parallel_size: int = 1
    # vLLM's data parallelism: this many engine cores, each a full (TP-sharded) copy
    # behind one server. A server setting (``vllm serve --data-parallel-size``):
    # the offline ``LLM`` runs one engine core.
    data_parallel_size: int = 1
    # Any other vLLM engine argument, applied last (e.g. enable_chunked_prefill).
    # Settings the defense does not run under (speculative_config,
    # async_scheduling=True, enable_prompt_embeds) make the engine refuse to start.
    engine_overrides: dict[str, Any] = field(default_factory=dict)

    def defense_section(self) -> dict[str, Any]:
        section: dict[str, Any] = {"proxy": models.resolve(self.proxy, "proxy")}
        if self.proxy_dtype:
            section["dtype"] = self.proxy_dtype
        if self.ads_grad:
            section["ads_grad"] = self.ads_grad
        if self.fault_file:
            section["fault_file"] = self.fault_file
        section.update(self.extra_defense)
        return section

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` or ``vllm.AsyncEngineArgs``.

        What the defense itself needs from the engine (processed logprobs, no
        async scheduling, the worker extension, the V1 runner) is not listed
        here: the package's vLLM plugin sets it on every engine whose
        ``additional_config`` has a ``distillgame`` section, whoever builds it
        (:mod:`distillgame.plugins.vllm_plugin`).
        """
        overrides = self.hf_overrides()
        section = self.defense_section()
        # Pinned, so the plugin does not reopen the choice made here with the policy in view.
        section.setdefault("proxy_runner", "vllm" if overrides else "transformers")
        kwargs: dict[str, Any] = dict(
            model=models.resolve(self.teacher, "teacher"),
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            gpu_memory_utilization=self.memory_share,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
            additional_config={"distillgame": section},
            disable_log_stats=self.disable_log_stats,
        )
        if overrides:
            kwargs["hf_overrides"] = overrides
        if self.tensor_parallel_size > 1:
            kwargs["tensor_parallel_size"] = self.tensor_parallel_size
        if self.data_parallel_size > 1:
            kwargs["data_parallel_size"] = self.data_parallel_size
        if self.num_gpu_blocks_override is not None:
            kwargs["num_gpu_blocks_override"] = self.num_gpu_blocks_override
        if self.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_bytes
        if _on_cpu():
            # vLLM rewinds a seeded request's generator after a step that
            # prefilled only part of its prompt (``Generator.set_offset``), and
            # CPU generators have no offset: the engine core dies on the first
            # seeded request whose prefill gets chunked, which happens whenever
            # one step's token budget is shared. Without chunking every prompt
            # is prefilled in one step (vLLM raises the budget to at least
            # max_model_len), so seeds are honoured.
            kwargs["enable_chunked_prefill"] = False
        kwargs.update(self.engine_overrides)
        return kwargs

    def environment(self) -> dict[str, str]:
        """Environment variables the engine needs from its launcher (set them before it starts).

        vLLM's CPU backend binds each worker's threads to one NUMA node by
        default and refuses to start more workers than the machine has nodes
        ("Not enough allowed NUMA nodes to bind threads of 2 local
        CPUWorkers"). Where tensor and data parallelism ask for more (one
        worker per TP rank of each DP engine core; vLLM reads the binding's
        ``|``-separated lists in DP-major order), the allowed cores are split
        among the workers (``VLLM_CPU_OMP_THREADS_BIND``), unless the caller
        set a binding of its own.
        """
        world = (int(self.engine_overrides.get("tensor_parallel_size", self.tensor_parallel_size))
                 * int(self.engine_overrides.get("data_parallel_size", self.data_parallel_size)))
        if world <= 1 or os.environ.get(CPU_BIND_ENV, "auto") != "auto" or not _on_cpu():
            return {}
        if _numa_nodes() >= world:
            return {}
        return {CPU_BIND_ENV: cpu_thread_binding(world, sorted(os.sched_getaffinity(0)))}

    def server_args(self) -> list[str]:
        """:meth:`engine_kwargs` as the command-line flags of vLLM's OpenAI server (``vllm serve``)."""
        options = _server_options()
        argv: list[str] = []
        for name, value in self.engine_kwargs().items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                negated = "--no-" + flag[2:]
                if value:
                    argv.append(flag)
                elif negated in options:
                    argv.append(negated)
                # else: a plain switch whose default is off.
            elif isinstance(value, (dict, list)):
                argv += [flag, json.dumps(value)]
            elif value is not None:
                argv += [flag, str(value)]
        return argv

    def hf_overrides(self) -> dict[str, Any] | None:
        """The engine's ``hf_overrides`` for :attr:`proxy_runner` (None: the teacher's own class)."""
        from distillgame.plugins.vllm_plugin import proxy_overrides

        return proxy_overrides(models.resolve(self.teacher, "teacher"), models.resolve(self.proxy, "proxy"),
                               self.proxy_runner, poe_served=self.poe_served)


class DefenseNotLive(RuntimeError):
    """A defended engine started, but some worker has no live defense processor: it must not serve."""


def verify_defense_live(statuses: list[dict[str, Any]]) -> None:
    """Raise :class:`DefenseNotLive` unless every worker reports a live processor.

    ``statuses`` is ``collective_rpc(status_rpc)``'s answer, one dict per worker
    (:meth:`~distillgame.plugins.processor.DefenseWorkerExtension.distillgame_status`).
    This is the check that catches what the processor itself cannot see,
    because vLLM never builds it: speculative decoding, or a launcher that
    left out the ``distillgame`` section.
    """
    if not statuses:
        raise DefenseNotLive("the engine reported no workers")
    for i, status in enumerate(statuses):
        if status.get("live", 0) >= 1:
            continue
        if status.get("speculative"):
            reason = "speculative decoding is on, and vLLM then builds no custom logits processors"
        elif not status.get("configured"):
            reason = "the engine has no additional_config['distillgame'] section"
        else:
            reason = "no defense processor was built"
        raise DefenseNotLive(f"worker {i}: {reason}; a defended engine must not serve")


def _server_options() -> set[str]:
    """Every option string vLLM's OpenAI server parses."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return {flag for action in make_arg_parser(FlexibleArgumentParser())._actions for flag in action.option_strings}


CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def cpu_thread_binding(workers: int, cpus: list[int]) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each of ``workers`` its own contiguous share of ``cpus``.

    ``cpu_thread_binding(2, [0, 1, 2, 3]) == "0,1|2,3"``; with fewer cores
    than workers, workers share cores round-robin (slow, but it runs).
    """
    if workers < 1 or not cpus:
        raise ValueError("need at least one worker and one cpu")
    per = max(1, len(cpus) // workers)
    groups = [cpus[i * per:(i + 1) * per] or [cpus[i % len(cpus)]] for i in range(workers)]
    return "|".join(",".join(str(c) for c in group) for group in groups)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` inside the block, the previous values after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _numa_nodes() -> int:
    """NUMA nodes this machine reports (1 where it reports none)."""
    import glob

    return max(1, len(glob.glob("/sys/devices/system/node/node[0-9]*")))


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def build_llm(config: EngineConfig):
    """A synchronous ``vllm.LLM`` with the defense, checked live in every worker.

    Call under ``if __name__ == "__main__"``. Raises :class:`DefenseNotLive`
    (after shutting the engine down) where the defense would not run.
    """
    prepare_environment()
    from vllm import LLM

    from distillgame.plugins.processor import status_rpc

    with _environment(config.environment()):  # read while the engine spawns its workers
        llm = LLM(**config.engine_kwargs())
    try:
        verify_defense_live(llm.collective_rpc(status_rpc))
    except DefenseNotLive:
        llm.llm_engine.engine_core.shutdown()
        raise
    return llm
