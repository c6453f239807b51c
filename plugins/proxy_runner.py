"""Batched incremental decoding of a Hugging Face causal LM beside the engine.

The engine decides which requests run each step; this runner keeps one KV
cache slot per defended request, each at its own length, so that one batched
forward serves every row of a step: rows that just arrived feed their whole
prefix (prompt plus any outputs, which is also how a preempted request is
replayed), the others feed the one token sampled last step.

Transformers' own caches keep one length for the whole batch, so the runner
brings its own (:class:`SlotKVCache`): per-slot buffers, writes at each row's
own offset, per-row ``position_ids`` and a 4D mask that hides every row's
unused tail. Prefill rows and one-token rows go in separate forwards
(at most two per step), because padding every decode row to the longest new
prompt would multiply the step's work by the prompt length.

On CPUs the proxy's linear layers run on the engine's own GEMM kernel
(:func:`use_engine_gemm`: oneDNN with weights prepacked once), which is what
vLLM runs the teacher on; PyTorch's default ``F.linear`` took about twice as
long for the same products here, most of it in the vocabulary-sized head.

Not for: sampling or mixing (see :mod:`distillgame.plugins.mixing`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import Cache

from distillgame.plugins.transfers import Staging

logger = logging.getLogger(__name__)

_GEMM_ATTR = "_distillgame_gemm"


def _engine_linear(ops, handler, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return ops.onednn_mm(handler, x, bias)


def _onednn_ops():
    """vLLM's custom ops module where it has the oneDNN GEMM (CPU builds), else None."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    return ops if getattr(ops, "_supports_onednn", False) else None


_NO_ONEDNN: set[torch.dtype] = set()


def _pack(ops, weight: torch.Tensor):
    """oneDNN's packed handler for ``weight``, or None where this CPU has no kernel for its dtype.

    bf16 GEMMs need AVX-512 (BF16) or AMX; on an AVX2-only CPU oneDNN cannot
    create the primitive, and ``F.linear`` is the fallback.
    """
    if weight.dtype in _NO_ONEDNN:
        return None
    try:
        return ops.create_onednn_mm(weight.t(), 32)
    except RuntimeError as exc:
        _NO_ONEDNN.add(weight.dtype)
        logger.info("oneDNN has no %s GEMM on this CPU (%s); the proxy uses torch's", weight.dtype, str(exc)[:60])
        return None


def engine_gemm(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x @ weight.T`` on the engine's GEMM (oneDNN, weight packed once) where it applies, else ``F.linear``."""
    ops = _onednn_ops() if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) else None
    handler = _pack(ops, weight) if ops is not None else None
    if handler is None:
        return functools.partial(torch.nn.functional.linear, weight=weight)
    handler.weight = weight  # keeps the source alive for as long as the handler
    return functools.partial(_engine_linear, ops, handler, None)


def use_engine_gemm(model: torch.nn.Module) -> int:
    """Route ``model``'s ``nn.Linear`` layers through vLLM's CPU GEMM; return how many.

    Each layer's weight is packed once into oneDNN's layout (a copy: the
    module keeps its own weight, so gradients, perturbed copies and
    ``state_dict`` see the usual parameters). Call it after the weights are
    final; changing a weight later does not reach the packed copy. Does
    nothing off the CPU or where vLLM's oneDNN ops are missing.
    """
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu":
        return 0
    ops = _onednn_ops()
    if ops is None:
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or _GEMM_ATTR in module.__dict__:
            continue
        weight = module.weight.detach()
        if weight.dtype not in (torch.float32, torch.bfloat16):
            continue
        handler = _pack(ops, weight)
        if handler is None:
            return count
        # An instance attribute shadows nn.Linear.forward; module() still runs hooks.
        module.__dict__[_GEMM_ATTR] = handler
        module.forward = functools.partial(_engine_linear, ops, handler, module.bias)
        count += 1
    return count


@contextlib.contextmanager
def plain_linears(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``model``'s linear layers are plain ``nn.Linear`` again (e.g. to deep-copy it)."""
    saved = []
    for module in model.modules():
        if _GEMM_ATTR in module.__dict__:
            saved.append((module, module.__dict__.pop(_GEMM_ATTR), module.__dict__.pop("forward")))
    try:
        yield model
    finally:
        for module, handler, forward in saved:
            module.__dict__[_GEMM_ATTR] = handler
            module.forward = forward


ATTENTION = "distillgame_slots"
# The backends the slot attention may use on CUDA (see grouped_query_attention).
_CUDA_ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def grouped_query_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA for grouped KV heads without repeating the keys/values (transformers attention interface).

    transformers' own SDPA path repeats each KV head for its query heads
    whenever a mask is given (as the slot cache's per-row mask always is):
    three copies of every cached key and value per layer and step for
    SmolLM2, the biggest cost of a long-context decode step. Here each KV
    head's query heads are folded into the query axis instead, and the mask
    repeats along with them.
    ``query`` is ``[B, H, T, D]``, ``key``/``value`` ``[B, Hkv, S, D]``; returns ``([B, T, H, D], None)``.
    """
    b, h, t, d = query.shape
    hkv = key.shape[1]
    rep = h // hkv
    q = query.reshape(b, hkv, rep * t, d)  # head h = kv * rep + r, so rows are (r, t) within a KV head
    mask = attention_mask
    if mask is not None and rep > 1:
        mask = mask.repeat(1, 1, rep, 1)
    if q.device.type == "cuda":
        # Not cuDNN's attention, which PyTorch picks first on Hopper: it builds an
        # execution plan for every new shape, and the keys' length changes every
        # step here. Measured on an H200 (bench/results/runner_step_h200/): 4.7 ms
        # of host time per layer and step, against 0.07 ms when the shape was cached.
        with sdpa_kernel(_CUDA_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, h, t, d).transpose(1, 2), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, grouped_query_attention)


class SlotKVCache(Cache):
    """Per-slot key/value buffers with one length per slot.

    Before each forward, :meth:`plan` says which slots the batch rows use and
    where each row's new tokens start; :meth:`update` (called by every
    attention layer) writes the new keys/values there and returns the rows'
    keys/values up to the longest row, which the 4D mask trims per row.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        initial_capacity: int = 128,
    ) -> None:
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.shape = (num_slots, num_kv_heads, initial_capacity, head_dim)
        self.dtype = dtype
        self.device = device
        self.keys = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._slots: torch.Tensor | None = None
        self._write_pos: torch.Tensor | None = None
        self._rows: slice | torch.Tensor | None = None
        self._kv_len = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def _grow(self, needed: int) -> None:
        new_cap = self.capacity
        while new_cap < needed:
            new_cap *= 2
        pad = new_cap - self.capacity
        logger.debug("proxy KV cache grows to %d positions per slot", new_cap)
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                extra = buf.new_zeros(buf.shape[0], buf.shape[1], pad, buf.shape[3])
                store[i] = torch.cat([buf, extra], dim=2)

    def plan(self, slots: torch.Tensor, starts: torch.Tensor, width: int, kv_len: int, first_slot: int | None) -> None:
        """Prepare a forward of ``width`` new positions for rows at ``slots`` starting at ``starts``.

        ``kv_len`` (the longest row's start plus ``width``) and ``first_slot``
        (the first slot when the rows sit on consecutive slots, else None) come
        from the caller's host-side lengths: reading them off the device tensors
        would make the host wait for the device.
        """
        if kv_len > self.capacity:
            self._grow(kv_len)
        self._slots = slots
        self._write_pos = starts[:, None] + torch.arange(width, device=starts.device)[None, :]
        self._kv_len = kv_len
        # Rows on consecutive slots (the usual case: slots are handed out in
        # order) read their keys/values as a view instead of a gathered copy.
        self._rows = slice(first_slot, first_slot + len(slots)) if first_slot is not None else slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        assert self._slots is not None and self._write_pos is not None, "plan() must precede a forward"
        slots = self._slots[:, None]
        # Advanced indices split by a slice put the indexed dims first: [B, T, H, D].
        self.keys[layer_idx][slots, :, self._write_pos, :] = key_states.transpose(1, 2)
        self.values[layer_idx][slots, :, self._write_pos, :] = value_states.transpose(1, 2)
        if isinstance(self._rows, slice):
            rows = self._rows
            return self.keys[layer_idx][rows, :, : self._kv_len], self.values[layer_idx][rows, :, : self._kv_len]
        # index_select copies each slot's block in one go: about 3x faster here than
        # advanced indexing, which goes element-strided (2.0 vs 0.7 ms for 32 slots x 700 positions).
        keys = torch.index_select(self.keys[layer_idx][:, :, : self._kv_len], 0, self._slots)
        values = torch.index_select(self.values[layer_idx][:, :, : self._kv_len], 0, self._slots)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def memory_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.keys + self.values)


@dataclass
class StagedBatch:
    """One forward's rows on the device (built from host lists through :class:`Staging`), and its host-side sizes."""

    ids: torch.Tensor  # [rows, width] new tokens, zero-padded
    n_new: torch.Tensor  # [rows]
    starts: torch.Tensor  # [rows] tokens already in each row's slot
    slots: torch.Tensor  # [rows]
    width: int
    kv_len: int
    first_slot: int | None  # see SlotKVCache.plan


class SlotRunner:
    """What the per-slot runners share: slots, :meth:`reset`, and :meth:`step` splitting rows by how much is new.

    A subclass sets ``lengths`` (tokens in each slot's cache, on the host),
    ``last`` (the last answer per slot, ``[slots, vocab]``), ``vocab_size``,
    ``device``, ``cache`` and ``staging``, and implements
    ``_forward(slots, tokens)`` returning the answers of rows with new tokens.
    Nothing here reads a device value back: sizes and offsets come from the
    host lists, and the device gets them through ``staging``.
    """

    lengths: list[int]
    last: torch.Tensor
    vocab_size: int
    device: torch.device
    cache: SlotKVCache
    staging: Staging

    def reset(self, slot: int) -> None:
        """Start ``slot`` afresh: nothing of its previous occupant may reach the new one."""
        self.lengths[slot] = 0
        # NaN, not zeros: a row that reads its slot's answer before feeding any
        # token would otherwise mix with stale or blank proxy log-probs; NaN
        # trips the processor's finite check and fails the step.
        self.last[slot] = float("nan")

    @torch.inference_mode()
    def step(self, slots: Sequence[int], new_tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Feed each row its new tokens; return the rows' answers for the next token ``[rows, vocab]`` (float32).

        ``new_tokens[i]`` continues slot ``slots[i]`` from its current length.
        Prefill rows and one-token rows go in separate forwards; a row with
        nothing new (e.g. a chunked-prefill step whose sample is discarded)
        gets its slot's last answer again.
        """
        self.staging.begin()
        rows_one = [i for i, toks in enumerate(new_tokens) if len(toks) == 1]
        rows_many = [i for i, toks in enumerate(new_tokens) if len(toks) > 1]
        rows_none = [i for i, toks in enumerate(new_tokens) if len(toks) == 0]
        answers = []
        for group in (rows_one, rows_many):
            if group:
                answers.append((group, self._forward([slots[i] for i in group], [new_tokens[i] for i in group])))
        if rows_none:
            (idx,) = self.staging.to_device([slots[i] for i in rows_none])
            answers.append((rows_none, self.last[idx]))
        if len(answers) == 1:
            # One kind of row (a pure decode or prefill step): already in row order.
            return answers[0][1]
        out = torch.empty(len(slots), self.vocab_size, dtype=torch.float32, device=self.device)
        positions = self.staging.to_device(*(group for group, _ in answers))
        for where, (_, answer) in zip(positions, answers):
            out[where] = answer
        return out

    def _stage_batch(self, slots: Sequence[int], tokens: Sequence[Sequence[int]]) -> StagedBatch:
        """The forward's inputs on the device, in one staged copy."""
        width = max(len(t) for t in tokens)
        n_new = [len(t) for t in tokens]
        starts = [self.lengths[s] for s in slots]
        ids = np.zeros((len(slots), width), dtype=np.int64)
        if width == 1:
            ids[:, 0] = [t[0] for t in tokens]
        else:
            for b, toks in enumerate(tokens):
                ids[b, : len(toks)] = toks
        ids_t, n_new_t, starts_t, slots_t = self.staging.to_device(ids, n_new, starts, slots)
        first = slots[0]
        consecutive = all(s == first + k for k, s in enumerate(slots))
        return StagedBatch(ids_t, n_new_t, starts_t, slots_t, width, max(starts) + width,
                           first if consecutive else None)

    def _advance(self, slots: Sequence[int], tokens: Sequence[Sequence[int]]) -> None:
        """After a forward: the slots' caches hold the new tokens too (host-side lengths)."""
        for s, toks in zip(slots, tokens):
            self.lengths[s] += len(toks)

    def _forward(self, slots: list[int], tokens: list[Sequence[int]]) -> torch.Tensor:
        raise NotImplementedError


class ProxyRunner(SlotRunner):
    """Runs one proxy model (or a perturbed copy of it) for many requests at once.

    Slots are owned by the caller (the logits processor): it allocates a slot
    per defended request, calls :meth:`reset` when a request (re)enters, and
    :meth:`step` once per engine step with every row that needs this model.
    """

    def __init__(self, model: torch.nn.Module, num_slots: int, device: torch.device, initial_capacity: int = 128) -> None:
        self.model = model
        self.engine_gemm_layers = use_engine_gemm(model)
        _register_attention()
        model.set_attn_implementation(ATTENTION)
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
        num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
        dtype = next(model.parameters()).dtype
        self.device = device
        self.num_slots = num_slots
        self.cache = SlotKVCache(
            text_config.num_hidden_layers, num_slots, num_kv_heads, head_dim, dtype, device, initial_capacity
        )
        self.lengths = [0] * num_slots  # tokens already in each slot's cache
        self.staging = Staging(device)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        # The last next-token log-probs per slot (see SlotRunner.step).
        self.last = torch.zeros(num_slots, self.vocab_size, dtype=torch.float32, device=device)
        self._decoder = getattr(model, "model", None)
        self._head = model.get_output_embeddings()

    def _forward(self, slots: list[int], tokens: list[Sequence[int]]) -> torch.Tensor:
        batch = self._stage_batch(slots, tokens)
        starts, n_new = batch.starts, batch.n_new
        positions = starts[:, None] + torch.arange(batch.width, device=self.device)[None, :]
        self.cache.plan(batch.slots, starts, batch.width, batch.kv_len, batch.first_slot)
        kv_pos = torch.arange(batch.kv_len, device=self.device)
        # Row b's query t sees key k iff k <= start_b + t (causal) and k lies in
        # the valid prefix start_b + n_new_b (hides padding and stale tails).
        visible = (kv_pos[None, None, :] <= positions[:, :, None]) & (
            kv_pos[None, None, :] < (starts + n_new)[:, None, None]
        )
        mask = visible[:, None, :, :]

        last = (n_new - 1).clamp_min(0)
        rows = torch.arange(len(slots), device=self.device)
        if self._decoder is not None:
            hidden = self._decoder(
                input_ids=batch.ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                use_cache=True,
            ).last_hidden_state
            logits = self._head(hidden[rows, last])
        else:
            logits = self.model(
                input_ids=batch.ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                use_cache=True,
            ).logits[rows, last]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        self.last[batch.slots] = logprobs
        self._advance(slots, tokens)
        return logprobs
