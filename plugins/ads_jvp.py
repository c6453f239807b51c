"""ADS's proxy side as one forward-mode pass: ``d/dt log p_proxy(theta + t g)`` at ``t = 0``.

ADS tilts the teacher by ``lam/(2*eps) * (log p(theta+eps*g) - log p(theta-eps*g))``,
a central finite difference whose limit (eps -> 0) is the directional derivative
``D = <g, grad_theta log p_proxy>``. Computing ``D`` directly needs no perturbed
copies of the proxy: every activation ``x`` travels with its tangent ``x'``
(how it moves along ``g``), and each layer maps both, e.g. a linear layer
``y = x W^T`` gives ``y' = x' W^T + x g_W^T``. Primal and tangent are separate
tensors, so the proxy's own dtype (bf16) keeps the tangent's precision, where
the finite difference in bf16 rounds the ``eps * g`` step away and must run its
two copies in float32 (1.7x the time of a bf16 forward each, measured here).

Cost per step: the proxy's weights ``W`` multiply the stacked ``[x; x']`` in one
GEMM, and ``g``'s weights multiply ``x``: a bf16 weight read of ``W`` and of ``g``
instead of two float32 copies. The KV cache holds keys/values and their
tangents (as many bytes as the two copies' caches).

Scope: Llama-family decoders (``LlamaForCausalLM`` layout: RMSNorm, rotary
attention with grouped KV heads, SiLU-gated MLP, no biases), which covers the
embedded and zoo proxies. :func:`unsupported_reason` says why another model is
refused; the processor then falls back to the finite-difference copies.

Not for: the teacher (it runs in vLLM) or training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from distillgame.plugins.proxy_runner import SlotKVCache, SlotRunner, StagedBatch, engine_gemm
from distillgame.plugins.transfers import Staging

Gemm = Callable[[torch.Tensor], torch.Tensor]


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """None if :class:`JvpProxyRunner` can differentiate ``model``; else why not."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} (only 'llama' is supported)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "biases in attention or MLP"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rope_type {rope.get('rope_type')!r}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    return None


@dataclass
class _DualLinear:
    """``y = x W^T`` and ``y' = x' W^T + x g^T`` with one GEMM for ``[x; x']``."""

    w: Gemm
    g: Gemm

    def __call__(self, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        both = self.w(torch.cat([x, dx]))
        return both[:n], both[n:] + self.g(x)


@dataclass
class _DualNorm:
    """RMSNorm (computed in float32 as transformers does) and its tangent."""

    weight: torch.Tensor
    g: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf, dxf = x.float(), dx.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        n = xf * r
        # d r = -r^3 * mean(x dx)
        dn = dxf * r - n * (r * r * (xf * dxf).mean(-1, keepdim=True))
        n_low = n.to(x.dtype)
        return self.weight * n_low, self.weight * dn.to(x.dtype) + self.g * n_low


@dataclass
class _Layer:
    in_norm: _DualNorm
    q: _DualLinear
    k: _DualLinear
    v: _DualLinear
    o: _DualLinear
    post_norm: _DualNorm
    gate: _DualLinear
    up: _DualLinear
    down: _DualLinear


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class JvpProxyRunner(SlotRunner):
    """Per-slot incremental decoding of the proxy and its tangent along ``g``.

    Same contract as :class:`~distillgame.plugins.proxy_runner.ProxyRunner`
    (slots, :meth:`reset`, one :meth:`step` per engine step), but :meth:`step`
    returns ``D[token] = d/dt log p_proxy(token | prefix; theta + t g)`` at ``t = 0``
    instead of log-probs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        grad: dict[str, torch.Tensor],
        num_slots: int,
        device: torch.device,
        initial_capacity: int = 128,
    ) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"forward-mode ADS does not support this proxy: {reason}")
        config = model.config
        self.dtype = next(model.parameters()).dtype
        self.device = device
        names = {id(p): n for n, p in model.named_parameters()}

        def g_of(param: torch.Tensor) -> torch.Tensor:
            return grad[names[id(param)]].to(device=device, dtype=self.dtype)

        def linear(module: torch.nn.Linear) -> _DualLinear:
            return _DualLinear(engine_gemm(module.weight.detach()), engine_gemm(g_of(module.weight)))

        def norm(module: torch.nn.Module) -> _DualNorm:
            return _DualNorm(module.weight.detach(), g_of(module.weight), float(module.variance_epsilon))

        decoder = model.model
        self.layers = [
            _Layer(norm(layer.input_layernorm), linear(layer.self_attn.q_proj), linear(layer.self_attn.k_proj),
                   linear(layer.self_attn.v_proj), linear(layer.self_attn.o_proj), norm(layer.post_attention_layernorm),
                   linear(layer.mlp.gate_proj), linear(layer.mlp.up_proj), linear(layer.mlp.down_proj))
            for layer in decoder.layers
        ]
        self.embed = decoder.embed_tokens.weight.detach()
        self.embed_g = g_of(decoder.embed_tokens.weight)
        self.norm = norm(decoder.norm)
        self.head = linear(model.get_output_embeddings())  # tied weights share one name, so one g
        self.rotary = decoder.rotary_emb
        self.num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.num_slots = num_slots
        # Layer i's keys/values live in cache layer i, their tangents in layer L + i.
        self.cache = SlotKVCache(2 * len(self.layers), num_slots, self.num_kv_heads, self.head_dim, self.dtype,
                                 device, initial_capacity)
        self.lengths = [0] * num_slots
        self.last = torch.zeros(num_slots, self.vocab_size, dtype=torch.float32, device=device)
        self.staging = Staging(device)

    def _attention(self, layer_idx: int, q, dq, k, dk, v, dv, mask):
        """Causal attention over the slot cache and its tangent; inputs ``[B, T, heads, D]``.

        Products in the model's dtype, softmax and its derivative in float32 (as
        transformers' eager attention). Grouped KV heads: each KV head's query
        heads are folded into the query axis, so keys are never repeated.
        """
        n_layers = len(self.layers)
        keys, values = self.cache.update(k.transpose(1, 2), v.transpose(1, 2), layer_idx)
        dkeys, dvalues = self.cache.update(dk.transpose(1, 2), dv.transpose(1, 2), n_layers + layer_idx)
        # The cache's views skip each slot's unused tail; the products below run about 2x
        # faster on a contiguous copy than on those strided views (bf16 on CPUs), copy included.
        keys, values, dkeys, dvalues = (x.contiguous() for x in (keys, values, dkeys, dvalues))
        b, t = q.shape[0], q.shape[1]
        rep = self.num_heads // self.num_kv_heads

        def fold(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, Hkv, rep * T, D]
            return x.view(b, t, self.num_kv_heads, rep, self.head_dim).permute(0, 2, 3, 1, 4).reshape(
                b, self.num_kv_heads, rep * t, self.head_dim)

        q, dq = fold(q), fold(dq)
        rows = q.shape[2]
        # Keys on the left, queries (and their tangents, stacked) on the right: the cache
        # is read in its own layout, once per product. The other way round
        # (q @ keys^T) made a contiguous copy of the transposed keys for every product:
        # 14 of 113 ms of a decode step (embedded proxy, 32 rows of 256 tokens, 2 CPU cores).
        both = torch.matmul(keys, torch.cat([q, dq], dim=2).transpose(-1, -2))  # [B, Hkv, kv, 2 * rows]
        scores = both[..., :rows].transpose(-1, -2).float() * self.scale
        dscores = (both[..., rows:] + torch.matmul(dkeys, q.transpose(-1, -2))).transpose(-1, -2).float() * self.scale
        fmask = mask.repeat(1, 1, rep, 1)  # [B, 1, rep * T, kv]
        probs = torch.softmax(scores.masked_fill_(~fmask, float("-inf")), dim=-1)
        # softmax' : dP = P * (dS - sum(P * dS))
        dprobs = probs * (dscores - (probs * dscores).sum(-1, keepdim=True))
        probs, dprobs = probs.to(self.dtype), dprobs.to(self.dtype)
        # The values too are read once for the output and its tangent's first term.
        mixed = torch.matmul(torch.cat([probs, dprobs], dim=2), values)
        attn = mixed[:, :, :rows]
        dattn = mixed[:, :, rows:] + torch.matmul(probs, dvalues)

        def unfold(x: torch.Tensor) -> torch.Tensor:  # [B, Hkv, rep * T, D] -> [B * T, H * D]
            return x.view(b, self.num_kv_heads, rep, t, self.head_dim).permute(0, 3, 1, 2, 4).reshape(b * t, -1)

        return unfold(attn), unfold(dattn)

    @torch.inference_mode()
    def sequence(self, token_ids: Sequence[int], start: int, slot: int = 0) -> torch.Tensor:
        """``D`` at every position from ``start`` on: row ``i`` is for the token after ``token_ids[:start + i]``.

        One full forward of the sequence (teacher forcing), as calibration needs;
        ``slot``'s cache is reset and then holds the sequence.
        """
        self.reset(slot)
        self.staging.begin()
        h, dh, _ = self._trunk([slot], [token_ids])
        picked = torch.arange(start - 1, len(token_ids) - 1, device=self.device)
        return self._head_derivative(h[picked], dh[picked])

    def _forward(self, slots: list[int], tokens: list[Sequence[int]]) -> torch.Tensor:
        h, dh, batch = self._trunk(slots, tokens)
        last = (batch.n_new - 1).clamp_min(0) + torch.arange(len(slots), device=self.device) * batch.width
        deriv = self._head_derivative(h[last], dh[last])
        self.last[batch.slots] = deriv
        return deriv

    def _head_derivative(self, h: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
        x, dx = self.norm(h, dh)
        z, dz = self.head(x, dx)
        logp = torch.log_softmax(z.float(), dim=-1)
        dz = dz.float()
        # d log softmax(z) = dz - E_p[dz]
        return dz - (logp.exp() * dz).sum(-1, keepdim=True)

    def _trunk(self, slots: list[int], tokens: list[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, StagedBatch]:
        """The decoder over each row's new tokens: hidden states and tangents ``[rows * width, hidden]``."""
        dev = self.device
        staged = self._stage_batch(slots, tokens)
        ids, starts, width, batch = staged.ids, staged.starts, staged.width, len(slots)
        positions = starts[:, None] + torch.arange(width, device=dev)[None, :]
        self.cache.plan(staged.slots, starts, width, staged.kv_len, staged.first_slot)
        kv_pos = torch.arange(staged.kv_len, device=dev)
        # As in ProxyRunner: causal, and only each row's valid prefix.
        mask = ((kv_pos[None, None, :] <= positions[:, :, None])
                & (kv_pos[None, None, :] < (starts + staged.n_new)[:, None, None]))[:, None]

        h = self.embed[ids].reshape(batch * width, -1)
        dh = self.embed_g[ids].reshape(batch * width, -1)
        cos, sin = self.rotary(h, positions)  # [B, T, D]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]

        def heads(x: torch.Tensor, n: int) -> torch.Tensor:
            return x.view(batch, width, n, self.head_dim)

        def rope(x: torch.Tensor) -> torch.Tensor:  # linear in x: the tangent rotates the same way
            return x * cos + _rotate_half(x) * sin

        for i, layer in enumerate(self.layers):
            x, dx = layer.in_norm(h, dh)
            q, dq = layer.q(x, dx)
            k, dk = layer.k(x, dx)
            v, dv = layer.v(x, dx)
            q, dq = rope(heads(q, self.num_heads)), rope(heads(dq, self.num_heads))
            k, dk = rope(heads(k, self.num_kv_heads)), rope(heads(dk, self.num_kv_heads))
            v, dv = heads(v, self.num_kv_heads), heads(dv, self.num_kv_heads)
            a, da = self._attention(i, q, dq, k, dk, v, dv, mask)
            o, do = layer.o(a, da)
            h, dh = h + o, dh + do
            x, dx = layer.post_norm(h, dh)
            gate, dgate = layer.gate(x, dx)
            up, dup = layer.up(x, dx)
            sig = torch.sigmoid(gate)
            act = gate * sig
            dact = sig * (1.0 + gate * (1.0 - sig))  # silu'
            m = act * up
            dm = dact * dgate * up + act * dup
            y, dy = layer.down(m, dm)
            h, dh = h + y, dh + dy
        self._advance(slots, tokens)
        return h, dh, staged
