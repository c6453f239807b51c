"""The reference oracle: the released next-token distribution, computed plainly.

Full recompute of teacher and proxy with transformers for every prefix (no KV
cache, no batching), mixing in float64. Small and obviously right, so tests can
hold the engine processor to it, and the benchmarks use the same models as the
"just run Hugging Face" baseline.

Not for: serving (it is quadratic in the sequence length by design).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from distillgame.plugins.ads_grad import perturbed_copy
from distillgame.plugins.mixing import Defense, ads_tilt, ads_tilt_derivative, parse_defense, poe_mix


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    return model


@dataclass
class ReferenceModels:
    """Teacher + proxy (+ ADS gradient) evaluated by full recompute."""

    teacher_path: str | Path
    proxy_path: str | Path
    ads_grad: dict[str, torch.Tensor] | None = None
    dtype: torch.dtype = torch.float32
    # As the engine's ads_method: "jvp" tilts by the directional derivative
    # itself (float64 forward-mode autodiff), "fd" by the request's eps finite difference.
    ads_method: str = "jvp"
    _cache: dict[Any, torch.nn.Module] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.teacher = load_causal_lm(self.teacher_path, self.dtype)
        self.proxy = load_causal_lm(self.proxy_path, self.dtype)

    def _perturbed(self, eps: float, sign: int) -> torch.nn.Module:
        key = (eps, sign)
        if key not in self._cache:
            if self.ads_grad is None:
                raise ValueError("ADS needs the proxy gradient (ads_grad)")
            self._cache[key] = perturbed_copy(self.proxy, self.ads_grad, sign * eps, self.dtype)
        return self._cache[key]

    def directional(self, token_ids: list[int]) -> torch.Tensor:
        """``<g, grad_theta log p_proxy>`` for the next token: forward-mode autodiff in float64.

        The proxy's weights (as loaded, in ``dtype``) are widened to float64, so this
        is the derivative of the model the engine runs, with no step size to choose.
        """
        from torch.func import functional_call, jvp

        if self.ads_grad is None:
            raise ValueError("ADS needs the proxy gradient (ads_grad)")
        if "proxy64" not in self._cache:
            model = copy.deepcopy(self.proxy).to(torch.float64)
            model.set_attn_implementation("eager")  # SDPA has no forward-mode AD on the CPU
            self._cache["proxy64"] = model
        model = self._cache["proxy64"]
        params = {n: p.detach() for n, p in model.named_parameters()}
        tangents = {n: self.ads_grad[n].to(torch.float64) for n in params}
        ids = torch.tensor([token_ids], dtype=torch.long)

        def logprobs(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.log_softmax(functional_call(model, p, (ids,)).logits[0, -1], dim=-1)

        _, deriv = jvp(logprobs, (params,), (tangents,))
        return deriv

    @staticmethod
    @torch.no_grad()
    def _logprobs(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([token_ids], dtype=torch.long)
        logits = model(input_ids=ids).logits[0, -1]
        return torch.log_softmax(logits.double(), dim=-1)

    def next_token_logprobs(
        self, token_ids: list[int], defense: dict[str, Any] | Defense | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """Log-probs (float64) of the released distribution after ``token_ids``.

        ``temperature`` divides the mixed logits as vLLM's sampler does after
        the logits processors (greedy requests: leave it at 1).
        """
        d = defense if isinstance(defense, Defense) else parse_defense({"distillgame": defense} if defense else None)
        teacher = self._logprobs(self.teacher, token_ids)
        if d.mode == "none":
            mixed = teacher
        else:
            vocab = min(teacher.shape[0], self._vocab(self.proxy))
            mixed = torch.full_like(teacher, float("-inf"))
            t = torch.log_softmax(teacher[:vocab], dim=-1)
            if d.mode == "poe":
                p = self._logprobs(self.proxy, token_ids)[:vocab]
                mixed[:vocab] = poe_mix(t, p, torch.tensor(d.gamma, dtype=torch.float64))
            else:
                lam = torch.tensor(d.lam, dtype=torch.float64)
                if self.ads_method == "jvp":
                    mixed[:vocab] = ads_tilt_derivative(t, self.directional(token_ids)[:vocab], lam)
                else:
                    plus = self._logprobs(self._perturbed(d.eps, +1), token_ids)[:vocab]
                    minus = self._logprobs(self._perturbed(d.eps, -1), token_ids)[:vocab]
                    eps = torch.tensor(d.eps, dtype=torch.float64)
                    mixed[:vocab] = ads_tilt(t, plus, minus, lam, eps)
        return torch.log_softmax(mixed / temperature, dim=-1)

    @staticmethod
    def _vocab(model: torch.nn.Module) -> int:
        return model.get_output_embeddings().weight.shape[0]
