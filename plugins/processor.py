"""The defense as a vLLM logits processor (V1 model runner interface).

Registered under the ``vllm.logits_processors`` entry-point group, so every
vLLM engine in the environment constructs it. It stays inert (loads nothing,
touches no row) unless the engine's ``additional_config`` has a
``distillgame`` section::

    {"distillgame": {"proxy": "<folder or HF id>", "dtype": "float32",
                     "ads_grad": "<file.safetensors>", "fault_file": "<path>"}}

Per request, ``SamplingParams.extra_args["distillgame"]`` picks the defense:
``{"mode": "poe", "gamma": g}`` (eq. 5), ``{"mode": "ads", "lam": l, "eps": e}``
or ``{"mode": "none"}``. The processor rewrites defended rows before
temperature/top-p/top-k, which vLLM then applies as usual.

ADS's proxy side (``ads_method``): ``"jvp"`` computes the directional
derivative ``<g, grad log p_proxy>`` that the finite difference approximates in
one forward-mode pass in the proxy's own dtype (:mod:`distillgame.plugins.ads_jvp`;
``eps`` then plays no part); ``"fd"`` runs the paper's two perturbed copies
``theta +- eps*g`` (float32). ``"auto"`` (default) takes ``"jvp"`` where the
proxy's architecture supports it (Llama family) and ``"fd"`` elsewhere.

Per step, the proxy's work is one batched forward per proxy model (the proxy,
and for ADS its forward-mode runner or its two perturbed copies). The step
never waits for the device: the bookkeeping (rows, slots, lengths, samples
left to count) is host Python fed by vLLM's batch updates, what the device
needs of it goes through a staging buffer with non-blocking copies, and the
fidelity counters accumulate on the device, read only by the
``distillgame_fidelity`` RPC (:mod:`distillgame.plugins.transfers`; the
``sync_audit`` setting checks it on a running engine).
Failures are not caught: an exception here aborts the engine step, so no token
is ever sampled from an undefended row (fail closed). That includes a proxy
that returns NaN or inf (a float16 proxy can overflow): a device-side assert,
with no host sync on GPUs, fails the step instead of releasing the teacher.

Supported engines (:func:`check_engine`, at start-up): the V1 model runner
without async scheduling, speculative decoding or prompt embeddings, a
``max_model_len`` within the proxy's positions, a proxy vocabulary covering
the teacher tokenizer's ids. Anything else refuses to start rather than
serve rows the tests never saw. Under Model Runner V2 the entry point stays
loadable (see :class:`DefenseLogitsProcessor`): undefended engines start, a
defended one refuses.

Not for: the per-token math (:mod:`distillgame.plugins.mixing`) or the
proxy's KV caches (:mod:`distillgame.plugins.proxy_runner`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import record_function
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from distillgame.plugins import paged_proxy
from distillgame.plugins.ads_grad import load_gradient, perturbed_copy
from distillgame.plugins.ads_jvp import JvpProxyRunner, unsupported_reason
from distillgame.plugins.mixing import (
    EXTRA_ARGS_KEY,
    MODE_INDEX,
    MODES,
    Defense,
    ads_tilt,
    ads_tilt_derivative,
    all_finite,
    kl_and_agreement_into,
    log_softmax_into,
    parse_defense,
    poe_mix,
    poe_mix_into,
    Workspace,
)
from distillgame.plugins.proxy_runner import ProxyRunner, plain_linears
from distillgame.plugins.transfers import Staging, SyncAudit, to_host

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# A child of vLLM's logger, so "defense ready" shows in the server's log beside vLLM's own lines.
logger = logging.getLogger("vllm.distillgame.processor")

# Names of the worker methods (see DefenseWorkerExtension): fidelity counters,
# and whether a live processor is installed.
fidelity_rpc = "distillgame_fidelity"
status_rpc = "distillgame_status"
sync_audit_rpc = "distillgame_sync_audit"

_LIVE: "weakref.WeakSet[DefenseLogitsProcessor]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DefenseSettings:
    """Engine-wide settings from ``additional_config["distillgame"]``."""

    proxy: str
    dtype: str | None = None
    ads_grad: str | None = None
    fault_file: str | None = None
    ads_max_eps: int = 4
    # "auto" | "jvp" | "fd": see the module docstring.
    ads_method: str = "auto"
    # Positions per slot allocated up front in each proxy KV cache. None: the
    # engine's max_model_len, so (like vLLM's own KV cache) the memory is
    # taken once at start and never grows while serving. A smaller value
    # saves memory on big proxies; the cache then doubles when a longer
    # sequence arrives, up to max_model_len.
    initial_cache_len: int | None = None
    # Diagnostics: audit every defended step for host synchronizations (see
    # distillgame.plugins.transfers.SyncAudit; read by the distillgame_sync_audit
    # RPC). On CUDA a synchronizing call then fails the step. Off in serving.
    sync_audit: bool = False
    # Where PoE's proxy runs when the engine's hf_overrides leave it open:
    # "auto" | "vllm" | "transformers" (distillgame.plugins.vllm_plugin.proxy_overrides).
    proxy_runner: str = "auto"
    # On vLLM's layers, a proxy that is an early exit of the teacher (its layers
    # are the teacher's first K, checked on the checkpoints) reads the teacher's
    # own state after layer K: no proxy layers run and no proxy KV is stored
    # (distillgame.plugins.early_exit). False runs it as a model of its own.
    shared_trunk: bool = True

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> "DefenseSettings":
        if not isinstance(section, dict) or not section.get("proxy"):
            raise ValueError("additional_config['distillgame'] must be an object with a 'proxy' folder or id")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown additional_config['distillgame'] keys: {unknown}; known: {sorted(known)}")
        if section.get("dtype") not in (None, *_DTYPES):
            raise ValueError(f"additional_config['distillgame']['dtype'] must be one of {list(_DTYPES)}")
        if section.get("ads_method", "auto") not in ("auto", "jvp", "fd"):
            raise ValueError("additional_config['distillgame']['ads_method'] must be 'auto', 'jvp' or 'fd'")
        if section.get("proxy_runner", "auto") not in ("auto", "vllm", "transformers"):
            raise ValueError("additional_config['distillgame']['proxy_runner'] must be 'auto', 'vllm' or 'transformers'")
        if not isinstance(section.get("shared_trunk", True), bool):
            raise ValueError("additional_config['distillgame']['shared_trunk'] must be true or false")
        return cls(**section)


def defense_section(vllm_config: "VllmConfig") -> dict[str, Any] | None:
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, dict):
        return None
    return extra.get(EXTRA_ARGS_KEY)


def check_engine(vllm_config: "VllmConfig") -> None:
    """Refuse engine settings under which the defense would run untested or not at all.

    - Async scheduling (vLLM's GPU default): the output-token lists a
      processor reads hold ``-1`` placeholders unless the input batch's
      ``logitsprocs_need_output_token_ids`` is set, which vLLM does only for
      processors passed via ``logits_processors=``, not for entry points.
    - Speculative decoding: ``build_logitsprocs`` then builds no custom
      processor at all, so this check can only run where some other code of
      ours sees the config (:func:`distillgame.engine.verify_defense_live`);
      kept here for engines that do build processors under it.
    - Prompt embeddings: a request without token ids gives the proxy nothing to read.
    """
    scheduler = vllm_config.scheduler_config
    if getattr(scheduler, "async_scheduling", False):
        raise ValueError(
            "the defense does not run under async scheduling (its output-token lists would hold "
            "placeholders); start the engine with async_scheduling=False (--no-async-scheduling)"
        )
    if getattr(vllm_config, "speculative_config", None):
        raise ValueError("the defense does not run with speculative decoding (vLLM turns custom "
                         "logits processors off); remove the speculative config")
    if getattr(vllm_config.model_config, "enable_prompt_embeds", False):
        raise ValueError("the defense needs token ids; start the engine without enable_prompt_embeds")


def check_proxy_coverage(proxy_config: Any, max_model_len: int, tokenizer_size: int, proxy_vocab: int) -> None:
    """Refuse a proxy that cannot see every position or score every token the engine may release."""
    text_config = proxy_config.get_text_config() if hasattr(proxy_config, "get_text_config") else proxy_config
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions and max_model_len > positions:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the proxy's max_position_embeddings {positions}; "
            f"start the engine with max_model_len <= {positions}"
        )
    if proxy_vocab < tokenizer_size:
        raise ValueError(
            f"the proxy's vocabulary ({proxy_vocab} rows) does not cover the teacher tokenizer's "
            f"{tokenizer_size} ids"
        )


def check_same_tokenizer(teacher: str, proxy: str) -> int:
    """Refuse a proxy whose tokenizer differs from the teacher's (the mix is per token id); return its size."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(teacher)
    p = AutoTokenizer.from_pretrained(proxy)
    tv, pv = t.get_vocab(), p.get_vocab()
    if tv != pv:
        only_t = sorted(set(tv.items()) - set(pv.items()))[:3]
        only_p = sorted(set(pv.items()) - set(tv.items()))[:3]
        raise ValueError(
            f"teacher ({teacher}) and proxy ({proxy}) tokenizers differ "
            f"({len(tv)} vs {len(pv)} entries; e.g. teacher-only {only_t}, proxy-only {only_p}); "
            "the defense mixes distributions token id by token id, so they must be identical"
        )
    return len(t)


@dataclass
class _Row:
    defense: Defense
    slot: int
    prompt: list[int]
    output: list[int]  # live list owned by the engine; grows each step
    runners: tuple[Any, ...]
    fed: int = 0
    # len(output) when apply() last sampled this row; None before its first step.
    # The sample was released iff the output has grown since (with chunked
    # prefill, a row still inside its prompt is sampled and the token dropped).
    sampled_at: int | None = None

    def released_last_sample(self) -> bool:
        return self.sampled_at is not None and len(self.output) > self.sampled_at

    def new_tokens(self) -> list[int]:
        n_prompt = len(self.prompt)
        if self.fed >= n_prompt:
            return self.output[self.fed - n_prompt :]
        return self.prompt[self.fed :] + list(self.output)


@dataclass
class _AdsPair:
    plus: ProxyRunner
    minus: ProxyRunner
    users: set[int] = field(default_factory=set)


class DefenseLogitsProcessor(LogitsProcessor, V2LogitsProcessor):
    """PoE and ADS rows mixed with a co-hosted proxy; everything else untouched.

    The class also subclasses Model Runner V2's processor interface, because
    vLLM loads every ``vllm.logits_processors`` entry point into every engine
    and V2 rejects V1-only classes at start-up: without it, installing the
    package would stop every undefended engine on a GPU. Under V2 it is inert
    (``add_request`` declines every row) and refuses to start if the engine
    is configured for the defense, which runs on the V1 runner only.
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        try:
            parse_defense(sampling_params.extra_args)
        except ValueError as exc:
            param = str(exc).split(" ", 1)[0]
            raise VLLMValidationError(str(exc), parameter=param) from exc

    def __init__(self, vllm_config: "VllmConfig", device: Any, is_pin_memory: bool | None = None) -> None:
        section = defense_section(vllm_config)
        self.active = section is not None
        self.rows: dict[int, _Row] = {}
        if is_pin_memory is None:
            # Model Runner V2 constructs processors as (vllm_config, req_states).
            self.active = False
            if section is not None:
                raise RuntimeError(
                    "the distillgame defense runs on vLLM's V1 model runner only; "
                    "set VLLM_USE_V2_MODEL_RUNNER=0 for this engine"
                )
            return
        if not self.active:
            return
        check_engine(vllm_config)
        with _LIVE_LOCK:
            for other in _LIVE:
                if other.active and other.vllm_config is vllm_config:
                    raise RuntimeError(
                        "distillgame's DefenseLogitsProcessor is loaded twice in one engine: it is "
                        "registered as a vllm.logits_processors entry point, which vLLM loads by itself; "
                        "do not also pass it via logits_processors= / --logits-processors"
                    )
            _LIVE.add(self)
        self.vllm_config = vllm_config
        self.settings = DefenseSettings.from_section(section)
        self.device = torch.device(device)
        model_config = vllm_config.model_config
        self.num_slots = vllm_config.scheduler_config.max_num_seqs
        self.free_slots = list(range(self.num_slots - 1, -1, -1))
        self.cache_len = self.settings.initial_cache_len or vllm_config.model_config.max_model_len

        tokenizer_size = check_same_tokenizer(model_config.tokenizer, self.settings.proxy)
        dtype = _DTYPES[self.settings.dtype] if self.settings.dtype else model_config.dtype
        from transformers import AutoConfig, AutoModelForCausalLM

        # Paged: the engine's model runs the proxy on vLLM's layers and KV cache
        # (distillgame.plugins.paged_proxy) and hands its logits over each step.
        self.paged = paged_proxy.is_paged(vllm_config)
        proxy_config = AutoConfig.from_pretrained(self.settings.proxy)
        proxy_vocab = proxy_config.get_text_config().vocab_size
        teacher_vocab = model_config.get_vocab_size()
        check_proxy_coverage(proxy_config, model_config.max_model_len, tokenizer_size, proxy_vocab)
        self.vocab = min(teacher_vocab, proxy_vocab)
        self.proxy: ProxyRunner | None = None
        self.proxy_model: torch.nn.Module | None = None
        if not self.paged or self.settings.ads_grad:
            # The transformers proxy: PoE's runner off the paged path, and ADS's
            # perturbed copies or tangents on either (vLLM's kernels carry no tangents).
            logger.info("loading proxy %s (%s, transformers) for the defense", self.settings.proxy, dtype)
            proxy = AutoModelForCausalLM.from_pretrained(self.settings.proxy, dtype=dtype).to(self.device).eval()
            self.proxy_model = proxy
            if not self.paged:
                self.proxy = ProxyRunner(proxy, self.num_slots, self.device, self.cache_len)
        self.ads_grad = load_gradient(self.settings.ads_grad, self.proxy_model) if self.settings.ads_grad else None
        self.ads_pairs: dict[float, _AdsPair] = {}
        self.ads_jvp: JvpProxyRunner | None = None
        self.ads_method = self._choose_ads_method(self.proxy_model)

        n_modes = len(MODES)
        self.kl_sum = torch.zeros(n_modes, dtype=torch.float64, device=self.device)
        self.tokens = torch.zeros(n_modes, dtype=torch.long, device=self.device)
        self.agree = torch.zeros(n_modes, dtype=torch.long, device=self.device)
        # Each slot's last sample, counted once it is known to be released (see _Row.sampled_at).
        self.pending_kl = torch.zeros(self.num_slots, dtype=torch.float64, device=self.device)
        self.pending_agree = torch.zeros(self.num_slots, dtype=torch.long, device=self.device)
        self.pending_mode = torch.zeros(self.num_slots, dtype=torch.long, device=self.device)
        # Slots whose request left after a released sample that apply() has not
        # counted yet: counted at the next apply() (or fidelity()), on the device.
        self.uncounted: list[int] = []
        self.staging = Staging(self.device, pin=bool(is_pin_memory) and self.device.type == "cuda")
        self.workspace = Workspace(self.vocab, self.device)
        self.audit = SyncAudit(self.device) if self.settings.sync_audit else None
        logger.info(
            "defense ready: proxy vocab %d, teacher vocab %d, %d slots, PoE proxy %s, ADS %s",
            proxy_vocab,
            teacher_vocab,
            self.num_slots,
            "in the engine's model (on the teacher's trunk or on vLLM's layers: the defended model's log line)"
            if self.paged else
            f"on transformers, KV cache {self.proxy.cache.memory_bytes() / (1 << 30):.2f} GiB "
            f"({self.cache_len} positions per slot)",
            f"on ({self.ads_method}, transformers)" if self.ads_grad is not None else "off",
        )

    def _choose_ads_method(self, proxy: torch.nn.Module) -> str:
        method = self.settings.ads_method
        if method == "fd" or self.ads_grad is None:
            return "fd"
        reason = unsupported_reason(proxy)
        if reason is None:
            return "jvp"
        if method == "jvp":
            raise ValueError(f"ads_method 'jvp' cannot differentiate proxy {self.settings.proxy}: {reason}")
        logger.info("ADS falls back to finite-difference copies: forward mode does not support %s", reason)
        return "fd"

    def _ads_runner(self) -> JvpProxyRunner:
        if self.ads_jvp is None:
            if self.ads_grad is None:
                raise RuntimeError(
                    "an ADS request reached an engine without an ADS gradient "
                    "(set additional_config['distillgame']['ads_grad'])"
                )
            with self._setup():
                self.ads_jvp = JvpProxyRunner(self.proxy_model, self.ads_grad, self.num_slots, self.device,
                                              self.cache_len)
        return self.ads_jvp

    def _setup(self) -> contextlib.AbstractContextManager[None]:
        """One-time construction that a step may trigger: outside the sync audit's per-step rule."""
        return self.audit.exempt() if self.audit is not None else contextlib.nullcontext()

    def is_argmax_invariant(self) -> bool:
        return not self.active

    def _ads_pair(self, eps: float) -> _AdsPair:
        pair = self.ads_pairs.get(eps)
        if pair is not None:
            return pair
        if self.ads_grad is None:
            raise RuntimeError(
                "an ADS request reached an engine without an ADS gradient "
                "(set additional_config['distillgame']['ads_grad'])"
            )
        unused = [e for e, p in self.ads_pairs.items() if not p.users]
        for e in unused:
            del self.ads_pairs[e]
        if len(self.ads_pairs) >= self.settings.ads_max_eps:
            raise RuntimeError(
                f"more than {self.settings.ads_max_eps} distinct ADS eps values are running at once "
                "(each needs its own pair of perturbed proxies; raise ads_max_eps)"
            )
        copies = []
        for sign in (+1.0, -1.0):
            # Float32 whatever the proxy's dtype (see perturbed_copy): in bf16 the
            # eps step would be rounded away.
            with self._setup(), plain_linears(self.proxy_model):
                clone = perturbed_copy(self.proxy_model, self.ads_grad, sign * eps)
                copies.append(ProxyRunner(clone, self.num_slots, self.device, self.cache_len))
        pair = self.ads_pairs[eps] = _AdsPair(*copies)
        return pair

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        """Model Runner V2: never take a row (a defended V2 engine does not get this far)."""
        return False

    def _release(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is not None:
            self._free(row)

    def _free(self, row: _Row) -> None:
        if row.released_last_sample():
            self.uncounted.append(row.slot)
        self.free_slots.append(row.slot)
        if row.defense.mode == "ads" and self.ads_method == "fd":
            pair = self.ads_pairs.get(row.defense.eps)
            if pair is not None:
                pair.users.discard(row.slot)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not self.active or batch_update is None:
            return
        if self.audit is None:
            self._update_state(batch_update)
            return
        with self.audit.guard():
            self._update_state(batch_update)

    def _update_state(self, batch_update: BatchUpdate) -> None:
        """Host-side bookkeeping only: which rows are live, their slots, what is left to count."""
        for index in batch_update.removed:
            self._release(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            # An add may replace the row at ``index`` without a removal first.
            self._release(index)
            defense = parse_defense(params.extra_args if params is not None else None)
            if not defense.active:
                continue
            if prompt_ids is None:
                raise ValueError("a defended request without prompt token ids (prompt embeddings) "
                                 "reached the defense; refusing to mix without the proxy's context")
            slot = self.free_slots.pop()
            if defense.mode == "poe":
                # Paged: the engine's model already runs the proxy on every row.
                runners: tuple[Any, ...] = () if self.paged else (self.proxy,)
            elif self.ads_method == "jvp":
                runners = (self._ads_runner(),)
            else:
                pair = self._ads_pair(defense.eps)
                pair.users.add(slot)
                runners = (pair.plus, pair.minus)
            for runner in runners:
                runner.reset(slot)
            # A (re-)added request replays its prompt and any outputs so far.
            self.rows[index] = _Row(defense, slot, list(prompt_ids), output_ids, runners)
        for a, b, direction in batch_update.moved:
            row_a = self.rows.pop(a, None)
            row_b = self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = row_b
            elif row_b is not None:
                # A one-way move overwrites b: its previous occupant is gone.
                self._free(row_b)

    def _check_fault(self) -> None:
        fault = self.settings.fault_file
        if fault and os.path.exists(fault):
            raise RuntimeError(f"injected proxy failure ({fault} exists)")

    def _count(self, into: tuple[torch.Tensor, torch.Tensor, torch.Tensor], slots: torch.Tensor) -> None:
        """Add the slots' pending samples to the fidelity counters ``into`` (eq. 1 budget), on the device."""
        kl_sum, tokens, agree = into
        mode = self.pending_mode[slots]
        kl_sum.index_add_(0, mode, self.pending_kl[slots])
        tokens.index_add_(0, mode, torch.ones_like(mode))
        agree.index_add_(0, mode, self.pending_agree[slots])

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if not self.active or not self.rows:
            return logits
        with record_function("distillgame.defense_apply"):
            if self.audit is None:
                return self._apply(logits)
            with self.audit.guard(step=True):
                return self._apply(logits)

    def _apply(self, logits: torch.Tensor) -> torch.Tensor:
        self._check_fault()
        self.staging.begin()
        indices = sorted(self.rows)
        rows = [self.rows[i] for i in indices]
        # Samples released since the last step: of rows that left, then of rows still here.
        done = self.uncounted + [row.slot for row in rows if row.released_last_sample()]
        poe = [p for p, row in enumerate(rows) if row.defense.mode == "poe"]
        ads = [p for p, row in enumerate(rows) if row.defense.mode == "ads"]
        # Everything the device needs from the host this step, in two staged copies.
        index_t, slot_t, mode_t, poe_t, ads_t, done_t = self.staging.to_device(
            indices, [row.slot for row in rows], [MODE_INDEX[row.defense.mode] for row in rows], poe, ads, done)
        gamma, lam, eps = (t[:, None] for t in self.staging.to_device(
            [rows[p].defense.gamma for p in poe], [rows[p].defense.lam for p in ads],
            [rows[p].defense.eps for p in ads], dtype=torch.float32))
        if done:
            self._count((self.kl_sum, self.tokens, self.agree), done_t)
            self.uncounted = []
        news = [row.new_tokens() for row in rows]
        for new in news:
            if -1 in new:
                raise RuntimeError("an output token placeholder reached the defense; refusing to guess")

        # One batched forward per proxy model for all rows that need it.
        per_runner: dict[int, tuple[ProxyRunner, list[int]]] = {}
        for pos, row in enumerate(rows):
            for runner in row.runners:
                per_runner.setdefault(id(runner), (runner, []))[1].append(pos)
        outputs: dict[int, tuple[torch.Tensor, list[int]]] = {}
        for key, (runner, positions) in per_runner.items():
            logprobs = runner.step([rows[p].slot for p in positions], [news[p] for p in positions])
            # Fail closed on a non-finite proxy (e.g. float16 overflow): the mix
            # would turn it into the tempered or plain teacher. Asynchronous on
            # GPUs: the step fails at vLLM's own sync, before any token is released.
            torch._assert_async(all_finite(logprobs[:, : self.vocab]),
                                "the defense's proxy returned NaN or inf; refusing to release this step")
            outputs[key] = (logprobs, positions)
        for row, new in zip(rows, news):
            row.fed += len(new)

        vocab = self.vocab
        if self.paged:
            # Taken every step (even without PoE rows): it must never outlive its step.
            paged = self._paged_channel().take(logits.shape[0], index_t[poe_t])
        # Four float32 [rows, vocab] buffers kept from step to step (see mixing.Workspace).
        teacher, mixed, scratch, scratch2 = self.workspace.get(len(rows))
        # The rows' logits in place when they are consecutive (the usual batch), else gathered.
        consecutive = indices[-1] - indices[0] == len(indices) - 1 and logits.dtype == torch.float32
        block = logits[indices[0]: indices[-1] + 1, :vocab] if consecutive else logits[index_t, :vocab].float()
        log_softmax_into(block, teacher, scratch)
        if len(poe) == len(rows):
            # Every defended row is PoE (the usual batch): mixed in place, no per-row gathers.
            gammas = [rows[p].defense.gamma for p in poe]
            if self.paged:
                proxy, normalized = scratch2.copy_(paged[:, :vocab]), False
                torch._assert_async(all_finite(proxy),
                                    "the defense's proxy returned NaN or inf; refusing to release this step")
            else:
                proxy, normalized = self._answers(outputs, rows, poe, role=0), True
            poe_mix_into(teacher, proxy, gamma, mixed, scratch, proxy_normalized=normalized, gamma_max=max(gammas))
        else:
            if poe:
                if self.paged:
                    proxy = torch.log_softmax(paged[:, :vocab].float(), dim=-1)
                    torch._assert_async(all_finite(proxy),
                                        "the defense's proxy returned NaN or inf; refusing to release this step")
                else:
                    proxy = self._answers(outputs, rows, poe, role=0)
                mixed[poe_t] = poe_mix(teacher[poe_t], proxy, gamma)
            if ads:
                first = self._answers(outputs, rows, ads, role=0)
                if self.ads_method == "jvp":
                    mixed[ads_t] = ads_tilt_derivative(teacher[ads_t], first, lam)
                else:
                    minus = self._answers(outputs, rows, ads, role=1)
                    mixed[ads_t] = ads_tilt(teacher[ads_t], first, minus, lam, eps)
            # What vLLM masked before us (allowed_token_ids, bad_words, min_tokens'
            # EOS, grammar bitmasks) stays masked: at gamma = 1 the mix would give
            # those tokens the proxy's mass (poe_mix_into keeps them masked itself).
            mixed.masked_fill_(torch.isneginf(teacher), float("-inf"))
        if consecutive:
            block.copy_(mixed)
        else:
            logits[index_t, :vocab] = mixed.to(logits.dtype)
        if logits.shape[1] > vocab:
            logits[index_t, vocab:] = float("-inf")

        # Fidelity stays on the device (no host sync per step) and is counted
        # only once the sample is known to be released (see _Row.sampled_at).
        kl, agree = kl_and_agreement_into(mixed, teacher, scratch, scratch2)
        self.pending_kl[slot_t] = kl.double()
        self.pending_agree[slot_t] = agree.long()
        self.pending_mode[slot_t] = mode_t
        for row in rows:
            row.sampled_at = len(row.output)
        return logits

    def _paged_channel(self) -> paged_proxy.ProxyLogits:
        found = paged_proxy.channel(self.vllm_config)
        if found is None:
            raise RuntimeError("the engine's model is not the defended model that computes the proxy's logits")
        return found

    def _answers(self, outputs: dict[int, tuple[torch.Tensor, list[int]]], rows: list[_Row], positions: list[int],
                 role: int) -> torch.Tensor:
        """The proxy answers ``[len(positions), vocab]`` of the rows at ``positions``, from their ``role``-th runner."""
        keys = {id(rows[p].runners[role]) for p in positions}
        if len(keys) == 1:
            answers, runner_positions = outputs[keys.pop()]
            if runner_positions == positions:
                # One runner serves exactly these rows (PoE, forward-mode ADS, one eps): its rows are in order.
                return answers[:, : self.vocab]
        picked = []
        for p in positions:
            answers, runner_positions = outputs[id(rows[p].runners[role])]
            picked.append(answers[runner_positions.index(p), : self.vocab])
        return torch.stack(picked)

    def fidelity(self) -> dict[str, dict[str, float | int]]:
        """The counters, with the samples released since the last step (a read of device values: for the RPC)."""
        counters = (self.kl_sum.clone(), self.tokens.clone(), self.agree.clone())
        done = self.uncounted + [row.slot for row in self.rows.values() if row.released_last_sample()]
        if done:
            self.staging.begin()
            self._count(counters, self.staging.to_device(done)[0])
        kl, tokens, agree = (to_host(c) for c in counters)
        return {
            mode: {"tokens": tokens[i], "kl_sum": kl[i], "argmax_agree": agree[i]}
            for i, mode in enumerate(MODES)
            if mode != "none"
        }

    def sync_audit(self) -> dict[str, Any] | None:
        return self.audit.report() if self.audit is not None else None

    def proxy_cache_bytes(self) -> int:
        if not self.active:
            return 0
        runners = [self.proxy] if self.proxy is not None else []
        runners += [r for p in self.ads_pairs.values() for r in (p.plus, p.minus)]
        runners += [self.ads_jvp] if self.ads_jvp is not None else []
        return sum(r.cache.memory_bytes() for r in runners)


class DefenseWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) to read the processor's state.

    ``engine.collective_rpc("distillgame_fidelity")`` returns one dict per worker,
    and so does ``engine.collective_rpc("distillgame_status")``;
    ``"distillgame_sync_audit"`` one list per worker (empty unless ``sync_audit`` is set).
    """

    def distillgame_status(self) -> dict[str, Any]:
        """Whether this worker's engine asks for the defense and has a live processor applying it."""
        config = getattr(self, "vllm_config", None)
        with _LIVE_LOCK:
            live = [p for p in _LIVE if p.active and (config is None or p.vllm_config is config)]
        return {
            "configured": config is not None and defense_section(config) is not None,
            "live": len(live),
            "speculative": bool(getattr(config, "speculative_config", None)),
            "async_scheduling": bool(getattr(getattr(config, "scheduler_config", None), "async_scheduling", False)),
            # Which data-parallel engine core (vLLM resets data_parallel_rank to 0 in the cores of a dense
            # model, whose replicas are independent; data_parallel_index keeps the core's rank).
            "dp_rank": _data_parallel_index(getattr(config, "parallel_config", None)),
            "tp_rank": _tensor_parallel_rank(),
        }

    def distillgame_kv_layout(self) -> dict[str, Any]:
        """vLLM's KV cache as allocated: blocks, groups, and per attention layer its page and bound bytes.

        On the paged path the proxy's layers (``distillgame_proxy.*``) are here
        beside the teacher's, in the same group (one block table).
        """
        runner = self.model_runner
        config = runner.kv_cache_config
        specs = runner.get_kv_cache_spec()
        context = self.vllm_config.compilation_config.static_forward_context
        layers = {}
        for name, spec in specs.items():
            cache = getattr(context.get(name), "kv_cache", None)
            if isinstance(cache, (list, tuple)):
                cache = cache[0] if cache else None
            layers[name] = {"page_bytes": spec.page_size_bytes, "block_size": spec.block_size,
                            "bound_bytes": cache.numel() * cache.element_size() if cache is not None else None}
        with _LIVE_LOCK:
            mine = [p for p in _LIVE if p.active and p.vllm_config is self.vllm_config]
        dense = sum(p.proxy_cache_bytes() for p in mine)
        exit_ = getattr(getattr(runner, "model", None), "early_exit", None)
        return {"num_blocks": config.num_blocks, "groups": [list(g.layer_names) for g in config.kv_cache_groups],
                "layers": layers, "dense_proxy_bytes": dense, "tp_rank": _tensor_parallel_rank(),
                "shared_trunk_layer": exit_.layer if exit_ is not None else None}

    def distillgame_weight_bytes(self) -> dict[str, Any]:
        """The weight bytes this worker holds: the engine model's teacher and proxy parts, and the proxy beside it.

        Read from each layer's per-rank partition (vLLM's ``input_size_per_partition``
        x ``output_size_per_partition``, the shard this tensor-parallel rank
        loaded) rather than from torch's parameters: vLLM's CPU kernels repack
        linear weights into buffers that no parameter holds. The transformers
        proxy (PoE off the paged path, ADS's runner) is a plain torch module.
        """
        model = getattr(self.model_runner, "model", None)
        parts = {"teacher": 0, "proxy": 0}
        shared: set[int] = set()  # a tied head holds the embedding's weight: count it once
        for name, module in model.named_modules() if model is not None else ():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.numel():
                if weight.untyped_storage().data_ptr() in shared:
                    continue
                shared.add(weight.untyped_storage().data_ptr())
            top = name.split(".", 1)[0]
            parts["proxy" if top.startswith("proxy") or top == paged_proxy.PROXY_PREFIX else "teacher"] += \
                _module_weight_bytes(module)
        with _LIVE_LOCK:
            mine = [p for p in _LIVE if p.active and p.vllm_config is self.vllm_config]
        beside = {id(p.proxy_model): p.proxy_model for p in mine if p.proxy_model is not None}
        return {"tp_rank": _tensor_parallel_rank(), "teacher_bytes": parts["teacher"], "proxy_bytes": parts["proxy"],
                "proxy_beside_bytes": sum(t.numel() * t.element_size() for m in beside.values()
                                          for t in m.parameters())}

    def distillgame_sync_audit(self) -> list[dict[str, Any]]:
        """What the audit saw in each live processor with ``sync_audit`` on (see :class:`SyncAudit`)."""
        with _LIVE_LOCK:
            live = [p for p in _LIVE if p.active]
        return [report for report in (p.sync_audit() for p in live) if report is not None]

    def distillgame_fidelity(self) -> dict[str, dict[str, float | int]]:
        """This worker's fidelity counters; zeros on tensor-parallel ranks other than 0.

        Every rank of a tensor-parallel group runs the processor on the same
        gathered logits and releases the same tokens, so only rank 0 reports:
        a sum over ``collective_rpc``'s answers counts each released token once.
        """
        total: dict[str, dict[str, float | int]] = {
            m: {"tokens": 0, "kl_sum": 0.0, "argmax_agree": 0} for m in MODES if m != "none"
        }
        if _tensor_parallel_rank() != 0:
            return total
        with _LIVE_LOCK:
            live = [p for p in _LIVE if p.active]
        for proc in live:
            for mode, stats in proc.fidelity().items():
                for key, value in stats.items():
                    total[mode][key] += value
        return total


def _module_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights ``module`` itself (not its children) holds on this rank (buffers such as rotary
    tables are not weights)."""
    weight = getattr(module, "weight", None)
    rows, cols = (getattr(module, "output_size_per_partition", None), getattr(module, "input_size_per_partition", None))
    if isinstance(weight, torch.Tensor) and rows is not None and cols is not None:
        bias = getattr(module, "bias", None)
        bias_bytes = bias.numel() * bias.element_size() if isinstance(bias, torch.Tensor) else 0
        return rows * cols * weight.element_size() + bias_bytes
    return sum(t.numel() * t.element_size() for t in module.parameters(recurse=False))


def _data_parallel_index(parallel_config: Any) -> int:
    """The data-parallel engine core this worker belongs to (0 without data parallelism)."""
    index = getattr(parallel_config, "data_parallel_index", None)
    if index is None:
        index = getattr(parallel_config, "data_parallel_rank", 0)
    return int(index or 0)


def _tensor_parallel_rank() -> int:
    """This worker's rank in its tensor-parallel group (0 where there is none)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (AssertionError, RuntimeError, ImportError):
        return 0
