"""``distillgame generate`` (a first smoke) and ``distillgame ads-grad``."""

from __future__ import annotations

import argparse
import logging

from distillgame import models

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="print one defended completion from a local engine")
    gen.add_argument("prompt")
    gen.add_argument("--defense", choices=["none", "poe", "ads"], default="poe")
    gen.add_argument("--gamma", type=float, default=models.DEFAULT_GAMMA,
                     help="PoE weight on the proxy (eq. 5); default: the embedded pair's, calibrated to "
                          f"{models.DEFAULT_KL_BUDGET} nats/token")
    gen.add_argument("--lam", type=float, default=0.05, help="ADS tilt strength")
    gen.add_argument("--eps", type=float, default=1e-4, help="ADS finite-difference step")
    gen.add_argument("--teacher", default=None, help="model folder or HF id (default: embedded SmolLM2)")
    gen.add_argument("--proxy", default=None, help="proxy folder or HF id (default: embedded)")
    gen.add_argument("--ads-grad", default=None, help="gradient file from `distillgame ads-grad`")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="no chat template: complete the prompt as is")
    gen.add_argument("--memory-share", type=float, default=0.2)
    gen.set_defaults(func=_generate)

    grad = sub.add_parser("ads-grad", help="compute the proxy's downstream-loss gradient for ADS")
    grad.add_argument("--proxy", default=None, help="proxy folder or HF id (default: embedded)")
    grad.add_argument("--traces", required=True, help='JSONL of {"prompt": ..., "completion": ...}')
    grad.add_argument("--out", required=True, help="output .safetensors")
    grad.add_argument("--batch-size", type=int, default=8)
    grad.add_argument("--max-length", type=int, default=1024)
    grad.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    grad.add_argument("--device", default="cpu")
    grad.set_defaults(func=_ads_grad)


def _generate(args: argparse.Namespace) -> int:
    from distillgame.engine import EngineConfig, build_llm
    from distillgame.plugins.mixing import parse_defense

    defense = {"none": {"mode": "none"}, "poe": {"mode": "poe", "gamma": args.gamma}}.get(
        args.defense, {"mode": "ads", "lam": args.lam, "eps": args.eps}
    )
    parse_defense({"distillgame": defense})
    llm = build_llm(
        EngineConfig(
            teacher=args.teacher,
            proxy=args.proxy,
            ads_grad=args.ads_grad,
            max_model_len=2048,
            max_num_seqs=4,
            memory_share=args.memory_share,
        )
    )
    from vllm import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        extra_args={"distillgame": defense},
    )
    if args.raw:
        out = llm.generate([args.prompt], params, use_tqdm=False)
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0


def _ads_grad(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillgame import models
    from distillgame.plugins.ads_grad import compute_gradient, model_fingerprint, read_traces, save_gradient

    torch.manual_seed(0)
    proxy = models.resolve(args.proxy, "proxy")
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(proxy, dtype=dtype).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(proxy)
    traces = read_traces(args.traces)
    result = compute_gradient(model, tokenizer, traces, batch_size=args.batch_size, max_length=args.max_length)
    save_gradient(result, args.out, proxy_id=str(proxy), fingerprint=model_fingerprint(model))
    norm = sum(float(g.double().pow(2).sum()) for g in result.grad.values()) ** 0.5
    logger.info("saved %s: %d traces, loss %.4f, |g| = %.4g", args.out, result.num_traces, result.loss, norm)
    return 0
