"""Is the proxy an early exit of the teacher? The check behind the shared-trunk proxy.

An early-exit proxy is the teacher's first ``K`` decoder layers with a head of
its own: the embedded proxy (ten layers and a fitted read-out,
:func:`distillgame.models.build_lens_proxy`) and what ``distillgame proxy``
builds for any teacher. Its state after layer ``K`` *is* the teacher's (same
weights, same tokens, same positions), so the engine can read it from the
teacher's own forward instead of running the proxy's layers and storing their
KV a second time (:class:`distillgame.plugins.paged_proxy.DefendedForCausalLM`).

That is only sound if the layers really are the teacher's, so this module
checks the checkpoints, not names or metadata: every tensor of the proxy
outside its final norm and head must be byte-identical (same dtype, same
values) to the teacher's tensor of the same name, and the two configs must
agree on everything that shapes a layer. Anything else (a trained student, a
proxy stored in another dtype, a fine-tuned copy) is not an early exit and
runs as a model of its own. The check reads the ``K`` layers once at start.

Not for: running anything (no vLLM import), or building proxies
(:mod:`distillgame.models`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Config keys that may differ between a teacher and its early exit: the depth,
# the head's tying, the storage dtype's label and bookkeeping. Every other key
# (widths, heads, rope, norm epsilon, activation...) shapes the layers.
_FREE_CONFIG_KEYS = frozenset({
    "num_hidden_layers", "layer_types", "tie_word_embeddings", "dtype", "torch_dtype",
    "_name_or_path", "transformers_version", "architectures", "max_window_layers",
    "use_cache", "vocab_size",
})
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
HEAD = "lm_head.weight"


@dataclass(frozen=True)
class EarlyExit:
    """Where the proxy leaves the teacher (after ``layer`` layers) and what it adds (``head_tensors``)."""

    layer: int
    teacher_layers: int
    head_tensors: tuple[str, ...]
    tied_head: bool


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index where there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            files.update({name: path for name in fh.keys()})
    return files


def _read(path: Path, name: str) -> Any:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(name)


def local_folder(model: str | Path, revision: str | None = None) -> Path | None:
    """A folder with the model's config and safetensors: the path itself, or the hub snapshot vLLM loads from."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # no hub, no such repo, offline: then it is simply not checked
        return None


def read_tensors(folder: Path, names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The named tensors of the checkpoint in ``folder``."""
    files = _tensor_files(folder)
    return {name: _read(files[name], name) for name in names}


def find_early_exit(teacher: str | Path, proxy: str | Path) -> tuple[EarlyExit | None, str]:
    """The proxy's exit layer if it is an early exit of the teacher, else None; and why, in words."""
    import torch

    teacher, proxy = Path(teacher), Path(proxy)
    if not (teacher / "config.json").exists() or not (proxy / "config.json").exists():
        return None, "the teacher's or the proxy's folder has no config.json"
    t_cfg, p_cfg = _config(teacher), _config(proxy)
    for key in sorted((set(t_cfg) | set(p_cfg)) - _FREE_CONFIG_KEYS):
        if t_cfg.get(key) != p_cfg.get(key):
            return None, f"config differs in {key!r} ({p_cfg.get(key)!r} vs the teacher's {t_cfg.get(key)!r})"
    depth, total = p_cfg.get("num_hidden_layers"), t_cfg.get("num_hidden_layers")
    if not isinstance(depth, int) or not isinstance(total, int) or not 0 < depth < total:
        return None, f"the proxy has {depth} layers, not fewer than the teacher's {total}"

    t_files, p_files = _tensor_files(teacher), _tensor_files(proxy)
    if not p_files:
        return None, "the proxy has no safetensors checkpoint"
    trunk = [n for n in p_files if _LAYER.match(n) or n == EMBEDDING]
    head = tuple(sorted(set(p_files) - set(trunk)))
    layers = {int(_LAYER.match(n).group(1)) for n in trunk if _LAYER.match(n)}
    if layers != set(range(depth)):
        return None, f"the proxy's checkpoint holds layers {sorted(layers)}, not 0..{depth - 1}"
    tied = bool(p_cfg.get("tie_word_embeddings", False))
    for name in sorted(trunk):
        if name not in t_files:
            return None, f"the teacher has no tensor {name}"
        ours, theirs = _read(p_files[name], name), _read(t_files[name], name)
        if ours.dtype != theirs.dtype or ours.shape != theirs.shape or not torch.equal(ours, theirs):
            return None, f"{name} is not the teacher's ({ours.dtype} {tuple(ours.shape)})"
    if EMBEDDING not in trunk:
        return None, f"the proxy's checkpoint has no {EMBEDDING}"
    return EarlyExit(layer=depth, teacher_layers=total, head_tensors=head, tied_head=tied), \
        f"its {depth} layers and embedding are the teacher's first {depth} of {total}"
