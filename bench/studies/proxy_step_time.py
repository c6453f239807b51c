"""Forward time of the embedded proxies against the teacher: PoE's physical limit 1 + t_p/t_t.

    python bench/studies/proxy_step_time.py

Interleaved full forwards of a 4 x 64-token batch in bf16 with transformers, one
thread, six rounds (the first dropped), median per model. A rough check that the
lens proxy costs what the plain 10-layer cut cost; the serving overhead itself
is measured by ``distillgame bench overhead``.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from distillgame import models


def main() -> None:
    torch.set_num_threads(1)
    teacher = models.default_teacher()
    folders = {"teacher": teacher, "cut": models.cache_dir() / "smollm2-135m-instruct-first10",
               "lens": models.default_proxy()}
    if not (folders["cut"] / "config.json").exists():
        models.truncate_model(teacher, folders["cut"], models.PROXY_LAYERS)
    loaded = {n: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval() for n, d in folders.items()}
    ids = torch.randint(0, 49000, (4, 64), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {n: [] for n in loaded}
    with torch.no_grad():
        for _ in range(6):
            for name, model in loaded.items():
                start = time.perf_counter()
                model(input_ids=ids)
                times[name].append(time.perf_counter() - start)
    med = {n: statistics.median(v[1:]) for n, v in times.items()}
    for name in ("cut", "lens"):
        ratio = med[name] / med["teacher"]
        print(f"{name}: {med[name]:.3f} s against the teacher's {med['teacher']:.3f} s; "
              f"t_p/t_t = {ratio:.3f}, PoE limit {1 + ratio:.2f}x")


if __name__ == "__main__":
    main()
