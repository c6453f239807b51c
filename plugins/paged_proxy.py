"""The proxy as a vLLM model: the teacher's own paged KV cache, kernels and memory profiler.

A defended engine normally runs the proxy beside vLLM, as a transformers
module with a dense KV cache per slot (:mod:`distillgame.plugins.proxy_runner`).
With this module the engine loads :class:`DefendedForCausalLM` instead of the
teacher's class: one vLLM model that holds two vLLM models, the teacher and
the proxy, built the way vLLM builds a speculative-decoding draft model
(``vllm/v1/spec_decode/draft_model.py``: the same ``VllmConfig`` with the
proxy's ``ModelConfig``, its own layer-name prefix). So:

- every proxy attention layer is a vLLM ``Attention`` layer registered in the
  engine's forward context, which gives it a KV cache spec next to the
  teacher's (``GPUModelRunner.get_kv_cache_spec``). Both are full attention,
  so the KV cache manager puts them in one group (``UniformTypeKVCacheSpecs``)
  and they share the teacher's block tables: a request's proxy context is the
  teacher's, through prefix caching and preemption, and the proxy's KV memory
  is allocated, counted and freed by vLLM per block of live tokens;
- one engine step runs the teacher and the proxy over the same scheduled
  tokens (``forward``) and returns their final hidden states side by side; the
  runner picks the rows it samples (``hidden_states[logits_indices]``) and
  calls :meth:`DefendedForCausalLM.compute_logits`, which returns the
  teacher's logits and leaves the proxy's hidden states, for the same rows,
  in a :class:`ProxyLogits`; the defense's logits processor runs the proxy's
  head on its PoE rows and mixes. The proxy
  runs on every scheduled token (defended or not): its cache has to hold
  every request's context, as vLLM fills caches per step, not per request.

The engine selects it through ``hf_overrides`` (what
:func:`hf_overrides` returns; :mod:`distillgame.engine` sets it, and
``vllm serve`` takes it as ``--hf-overrides``): ``architectures`` names this
class, registered with vLLM's model registry by the ``vllm.general_plugins``
entry point (:func:`register`), and ``distillgame_architectures`` keeps the
teacher's own.

Not for: the mixing (:mod:`distillgame.plugins.processor`,
:mod:`distillgame.plugins.mixing`), or ADS's perturbed proxies and tangents,
which vLLM's attention kernels cannot carry (they stay on the transformers
runner).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.profiler import record_function

from distillgame.plugins import early_exit

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# A child of vLLM's logger, so the choice of path shows in the server's log beside vLLM's own lines.
logger = logging.getLogger("vllm.distillgame.paged_proxy")

ARCHITECTURE = "DistillgameDefendedForCausalLM"
# hf_config attribute holding the teacher's own architectures under hf_overrides.
TEACHER_ARCHITECTURES = "distillgame_architectures"
PROXY_PREFIX = "distillgame_proxy"


def register() -> None:
    """``vllm.general_plugins`` entry point: make :data:`ARCHITECTURE` loadable by every vLLM process."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:DefendedForCausalLM")


def hf_overrides(teacher_architectures: list[str]) -> dict[str, Any]:
    """The ``hf_overrides`` that load the teacher and the proxy as one vLLM model."""
    return {"architectures": [ARCHITECTURE], TEACHER_ARCHITECTURES: list(teacher_architectures)}


def unsupported_reason(proxy_architectures: list[str] | None) -> str | None:
    """Why vLLM cannot run a proxy of these architectures as one of its models, or None if it can."""
    from vllm import ModelRegistry

    if not proxy_architectures:
        return "its config names no architecture"
    supported = ModelRegistry.get_supported_archs()
    if not any(a in supported and a != ARCHITECTURE for a in proxy_architectures):
        return f"vLLM has no model class for {proxy_architectures}"
    return None


def is_paged(vllm_config: "VllmConfig") -> bool:
    """Whether this engine runs the proxy as a vLLM model (its architecture is :data:`ARCHITECTURE`)."""
    hf_config = getattr(vllm_config.model_config, "hf_config", None)
    return ARCHITECTURE in (getattr(hf_config, "architectures", None) or [])


class ProxyLogits:
    """The proxy's final hidden states for the rows of the step being sampled, from the model to the processor.

    :meth:`put` runs in ``compute_logits``, :meth:`take` in the logits
    processor's ``apply`` of the same step (vLLM computes prompt logprobs
    only after sampling). The head runs in :meth:`take`, on the rows the
    processor asks for (its PoE rows): undefended rows never pay for the
    proxy's vocabulary-sized product. A take empties the hand-over, and a take
    that finds nothing, or rows that are not the step's, raises: the step
    fails rather than mix another step's proxy into it.
    """

    def __init__(self) -> None:
        self._hidden: torch.Tensor | None = None
        self._head: Callable[[torch.Tensor], torch.Tensor] | None = None

    def put(self, hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._hidden, self._head = hidden, head

    def take(self, rows: int, index: torch.Tensor) -> torch.Tensor | None:
        """The proxy's logits for rows ``index`` of a step that samples ``rows`` rows (None for no rows)."""
        hidden, head = self._hidden, self._head
        self._hidden = self._head = None
        if hidden is None or head is None:
            raise RuntimeError("the engine computed no proxy states for this step; refusing to release it")
        if hidden.shape[0] != rows:
            raise RuntimeError(f"the proxy's states have {hidden.shape[0]} rows for a step sampling {rows}; "
                               "refusing to release it")
        return head(hidden[index]) if index.shape[0] else None


# One per engine (keyed by its VllmConfig): the processor finds its model's channel here.
_CHANNELS: dict[int, ProxyLogits] = {}


def channel(vllm_config: "VllmConfig") -> ProxyLogits | None:
    return _CHANNELS.get(id(vllm_config))


def proxy_model_config(vllm_config: "VllmConfig", proxy: str, dtype: str | None) -> Any:
    """The proxy's ``ModelConfig``: the teacher's tokenizer and limits, the proxy's weights (as for a draft model)."""
    from vllm.config import ModelConfig

    target = vllm_config.model_config
    return ModelConfig(
        model=proxy,
        tokenizer=target.tokenizer,
        tokenizer_mode=target.tokenizer_mode,
        trust_remote_code=target.trust_remote_code,
        dtype=dtype or target.dtype,
        seed=target.seed,
        max_model_len=target.max_model_len,
        enforce_eager=target.enforce_eager,
        max_logprobs=target.max_logprobs,
    )


class DefendedForCausalLM(nn.Module):
    """The teacher and the proxy as one vLLM model; see the module docstring."""

    def __init__(self, *, vllm_config: "VllmConfig", prefix: str = "") -> None:
        super().__init__()
        from vllm.compilation.backends import set_model_tag
        from vllm.config.utils import replace
        from vllm.model_executor.model_loader.utils import initialize_model
        from vllm.model_executor.models.registry import ModelRegistry

        from distillgame.plugins.processor import DefenseSettings, defense_section

        section = defense_section(vllm_config)
        if section is None:
            raise ValueError(f"{ARCHITECTURE} needs additional_config['distillgame'] with its proxy")
        settings = DefenseSettings.from_section(section)
        model_config = vllm_config.model_config
        teacher_archs = getattr(model_config.hf_config, TEACHER_ARCHITECTURES, None)
        if not teacher_archs:
            raise ValueError(f"{ARCHITECTURE} needs hf_overrides['{TEACHER_ARCHITECTURES}'], the teacher's own "
                             "architectures (see distillgame.plugins.paged_proxy.hf_overrides)")
        teacher_cls, _ = ModelRegistry.resolve_model_cls(teacher_archs, model_config)
        self.teacher = teacher_cls(vllm_config=vllm_config, prefix=prefix)
        self.teacher_dtype = model_config.dtype
        self.teacher_hidden = model_config.get_hidden_size()

        self.proxy_config = proxy_model_config(vllm_config, settings.proxy, settings.dtype)
        self.proxy_dtype = self.proxy_config.dtype
        self.proxy_hidden = self.proxy_config.get_hidden_size()
        self.channel = _CHANNELS[id(vllm_config)] = ProxyLogits()
        self.early_exit, why = self._find_early_exit(settings, model_config)
        if self.early_exit is not None:
            self._init_shared_trunk(self.early_exit)
            logger.info("defended model: proxy %s is an early exit of teacher %s (%s): shared trunk, the proxy's "
                        "norm and head read the teacher's state after layer %d; no proxy layers, no proxy KV",
                        settings.proxy, teacher_archs[0], why, self.early_exit.layer)
            return
        # Quantization is the teacher's; the proxy loads as its checkpoint is.
        proxy_vllm_config = replace(vllm_config, model_config=self.proxy_config, quant_config=None)
        with set_model_tag(PROXY_PREFIX):
            self.proxy = initialize_model(proxy_vllm_config, prefix=PROXY_PREFIX, model_config=self.proxy_config)
        logger.info("defended model: teacher %s and proxy %s (%s, %s) in one vLLM model, proxy KV in vLLM's cache "
                    "(not a shared trunk: %s)", teacher_archs[0], settings.proxy, self.proxy_config.architecture,
                    self.proxy_dtype, why)

    def _find_early_exit(self, settings: Any, model_config: Any) -> tuple[early_exit.EarlyExit | None, str]:
        """The proxy's exit layer where the shared trunk can serve it (see :mod:`early_exit`), and why (not)."""
        from vllm.model_executor.models.interfaces import supports_eagle3

        if not settings.shared_trunk:
            return None, "shared_trunk is off"
        if self.proxy_dtype != self.teacher_dtype:
            return None, f"the proxy runs in {self.proxy_dtype}, the teacher in {self.teacher_dtype}"
        # vLLM's EAGLE-3 interface is how a model hands out its state after a given layer.
        if not supports_eagle3(self.teacher) or not hasattr(getattr(self.teacher, "model", None), "norm"):
            return None, f"{type(self.teacher).__name__} exposes no intermediate states (vLLM's SupportsEagle3)"
        folders = [early_exit.local_folder(m, getattr(c, "revision", None))
                   for m, c in ((model_config.model, model_config), (settings.proxy, self.proxy_config))]
        if None in folders:
            return None, "the teacher's or the proxy's checkpoint is not on this machine"
        found, why = early_exit.find_early_exit(*folders)
        if found is None:
            return None, why
        needed = {early_exit.FINAL_NORM} | (set() if found.tied_head else {early_exit.HEAD})
        if set(found.head_tensors) != needed:
            return None, f"its own tensors are {list(found.head_tensors)}, not a final norm and a head"
        self._proxy_folder = folders[1]
        return found, why

    def _init_shared_trunk(self, found: early_exit.EarlyExit) -> None:
        """The proxy's final norm and head, on the teacher's state after layer ``found.layer``."""
        import copy

        from vllm.model_executor.layers.logits_processor import LogitsProcessor
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        hf = self.proxy_config.hf_config
        self.proxy_norm = copy.deepcopy(self.teacher.model.norm)
        if found.tied_head:
            # Tied to the proxy's embedding, which is the teacher's (checked): one copy in memory.
            self.proxy_head = self.teacher.model.embed_tokens
        else:
            self.proxy_head = ParallelLMHead(hf.vocab_size, hf.hidden_size, prefix=f"{PROXY_PREFIX}.lm_head")
        self.proxy_logits = LogitsProcessor(hf.vocab_size, scale=getattr(hf, "logit_scale", 1.0))
        self.teacher.set_aux_hidden_state_layers((found.layer,))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.teacher.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: Any = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("the defended model needs token ids (the proxy reads them)")
        # The labels name the parts in a torch profile (bench/step_profile.py); free otherwise.
        with record_function("distillgame.teacher_forward"):
            teacher = self.teacher(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if self.early_exit is not None:
            # The teacher's EAGLE-3 output: its final state and its residual stream after the exit layer.
            final, (trunk,) = teacher
            with record_function("distillgame.hidden_concat"):
                return torch.cat([final, trunk], dim=-1)
        with record_function("distillgame.proxy_forward"):
            proxy = self.proxy(input_ids, positions)
        # Side by side in the wider dtype (a bf16 teacher's states survive float32 exactly).
        with record_function("distillgame.hidden_concat"):
            dtype = torch.promote_types(teacher.dtype, proxy.dtype)
            return torch.cat([teacher.to(dtype), proxy.to(dtype)], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        teacher, proxy = hidden_states.split([self.teacher_hidden, self.proxy_hidden], dim=-1)
        self.channel.put(proxy.to(self.proxy_dtype), self._proxy_head)
        with record_function("distillgame.teacher_logits"):
            return self.teacher.compute_logits(teacher.to(self.teacher_dtype))

    def _proxy_head(self, hidden: torch.Tensor) -> torch.Tensor:
        with record_function("distillgame.proxy_logits"):
            if self.early_exit is not None:
                return self.proxy_logits(self.proxy_head, self.proxy_norm(hidden))
            return self.proxy.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The teacher's checkpoint (``weights``), then the proxy's from its own folder."""
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
        from vllm.config import LoadConfig

        loaded = {f"teacher.{name}" for name in (self.teacher.load_weights(weights) or ())}
        if self.early_exit is not None:
            return loaded | self._load_shared_head()
        loader = DefaultModelLoader(LoadConfig())
        proxy_loaded = self.proxy.load_weights(loader.get_all_weights(self.proxy_config, self.proxy))
        if proxy_loaded is None:
            proxy_loaded = {name for name, _ in self.proxy.named_parameters()}
        loaded |= {f"proxy.{name}" for name in proxy_loaded}
        return loaded

    def _load_shared_head(self) -> set[str]:
        """The proxy's final norm and (untied) head, read from its checkpoint; its layers are the teacher's."""
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        tensors = early_exit.read_tensors(self._proxy_folder, self.early_exit.head_tensors)
        default_weight_loader(self.proxy_norm.weight, tensors[early_exit.FINAL_NORM])
        loaded = {"proxy_norm.weight"}
        if not self.early_exit.tied_head:
            self.proxy_head.weight_loader(self.proxy_head.weight, tensors[early_exit.HEAD])
            loaded.add("proxy_head.weight")
        return loaded
