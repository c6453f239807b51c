"""The proxy's downstream-loss gradient ``g`` that antidistillation sampling tilts along.

``g = grad_theta L(theta)`` with ``L`` the proxy's mean next-token loss on the
completion tokens of a set of holdout traces (prompt tokens masked). Saved as
safetensors keyed by parameter name, with metadata that ties it to the proxy
it was computed on, so a gradient from another model is refused at load.

Not for: training (see the attack harness); this is one full-batch gradient.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from tqdm import tqdm

logger = logging.getLogger(__name__)


def perturbed_copy(
    model: torch.nn.Module, grad: dict[str, torch.Tensor], scale: float, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype`` with parameters ``theta + scale * g`` (ADS's perturbed proxies).

    Float32 by default whatever the proxy's own dtype: ADS divides the two
    copies' log-prob difference by ``2 * eps``, and in bfloat16 (8 bits of
    mantissa) a step of ``eps * g`` is mostly rounded away, which leaves
    rounding noise times ``lam / (2 * eps)`` as the tilt.
    """
    clone = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        for name, param in clone.named_parameters():
            if name in grad:
                param.add_(grad[name].to(param.device, dtype), alpha=scale)
    return clone


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes and bf16-rounded values: identifies the proxy's weights."""
    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(str(tuple(param.shape)).encode())
        # bf16 rounding makes a float32 checkpoint and its bf16 copy agree.
        h.update(param.detach().to(torch.bfloat16).view(torch.int16).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def read_traces(path: str | Path) -> list[dict[str, str]]:
    traces = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
                raise ValueError(f"{path}:{lineno}: each line needs string fields 'prompt' and 'completion'")
            traces.append({"prompt": row["prompt"], "completion": row["completion"]})
    if not traces:
        raise ValueError(f"{path} has no traces")
    return traces


@dataclass
class GradResult:
    grad: dict[str, torch.Tensor]
    loss: float
    num_traces: int


def compute_gradient(
    model: torch.nn.Module, tokenizer, traces: list[dict[str, str]], batch_size: int = 8, max_length: int = 1024
) -> GradResult:
    """Gradient of the mean per-trace completion loss, accumulated over batches."""
    model.eval()
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    total_loss = 0.0
    n = len(traces)
    for start in tqdm(range(0, n, batch_size), desc="ads-grad", unit="batch"):
        batch = traces[start : start + batch_size]
        seqs, masks = [], []
        for tr in batch:
            p = tokenizer(tr["prompt"], add_special_tokens=False)["input_ids"]
            c = tokenizer(tr["completion"], add_special_tokens=False)["input_ids"]
            ids = (p + c)[:max_length]
            seqs.append(ids)
            masks.append(([0] * len(p) + [1] * len(c))[:max_length])
        width = max(len(s) for s in seqs)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        target_mask = torch.zeros((len(seqs), width), dtype=torch.float32)
        for i, (s, m) in enumerate(zip(seqs, masks)):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            target_mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
        ids, attn, target_mask = ids.to(device), attn.to(device), target_mask.to(device)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(ids.shape[0], -1)
        mask = target_mask[:, 1:]
        per_trace = (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        # Each batch contributes its share of the mean over all traces.
        loss = per_trace.sum() / n
        loss.backward()
        total_loss += float(loss.detach())
    grad = {
        name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)).to(torch.float32).contiguous()
        for name, p in model.named_parameters()
    }
    model.zero_grad(set_to_none=True)
    return GradResult(grad, total_loss, n)


def save_gradient(result: GradResult, out: str | Path, proxy_id: str, fingerprint: str) -> None:
    metadata = {
        "proxy": proxy_id,
        "proxy_sha256": fingerprint,
        "num_traces": str(result.num_traces),
        "loss_before": repr(result.loss),
        "format": "distillgame.ads_grad.v1",
    }
    save_file(result.grad, str(out), metadata=metadata)


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def load_gradient(path: str | Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Load ``g`` for ``model``; refuse it with a clear message if it belongs to another model."""
    grad = load_file(str(path))
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(grad))
    extra = sorted(set(grad) - set(params))
    if missing or extra:
        raise ValueError(
            f"ADS gradient {path} does not match the proxy: {len(missing)} proxy parameters missing "
            f"(e.g. {missing[:2]}), {len(extra)} unknown names (e.g. {extra[:2]}); "
            "was it computed for another model?"
        )
    for name, p in params.items():
        if tuple(grad[name].shape) != tuple(p.shape):
            raise ValueError(
                f"ADS gradient {path} does not match the proxy: {name} has shape "
                f"{tuple(grad[name].shape)}, the proxy's is {tuple(p.shape)}"
            )
    expected = read_metadata(path).get("proxy_sha256")
    if expected and expected != model_fingerprint(model):
        raise ValueError(
            f"ADS gradient {path} was computed for another proxy (weights fingerprint "
            f"{expected[:12]}..., this proxy's is {model_fingerprint(model)[:12]}...): recompute it with "
            "`distillgame ads-grad` for this proxy"
        )
    return grad
