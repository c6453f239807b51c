"""The defense under vLLM's data parallelism: ``distillgame serve --data-parallel-size 2``.

One real server with two engine cores behind vLLM's own OpenAI app (vLLM
balances requests between them), on the tiny pair. vLLM's CPU backend binds
each core's worker to its own CPUs; ``distillgame serve`` sets
``VLLM_CPU_OMP_THREADS_BIND`` for it (``0|1`` on two cores). Checked:
``/health`` is 200 only after the status call has reached both cores (the
server's client would answer for the first core only, see
``server.gateway.every_worker``); requests served by each core are the
float64 oracle's PoE distribution within 1e-4; the fidelity counters count
the tokens of both cores.
"""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest
import torch

from conftest_server import ServerProcess, metric_sum

ENGINE_START_S = 420
GAMMA = 0.65  # the test policy's standard tier
TOL = 1e-4


@pytest.fixture(scope="module")
def dp_server(tiny_pair, tmp_path_factory):
    teacher, proxy = tiny_pair
    server = ServerProcess(tmp_path_factory.mktemp("dp"))
    server.start(["--teacher", str(teacher), "--proxy", str(proxy), "--data-parallel-size", "2",
                  "--max-model-len", "256", "--kv-cache-gib", "0.05"])
    try:
        server.wait_ready(timeout=ENGINE_START_S)
        yield server
    finally:
        server.stop()


def _per_core(text: str, name: str) -> dict[str, float]:
    """``name``'s value per vLLM ``engine`` label."""
    cores: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and 'engine="' in line:
            core = line.split('engine="', 1)[1].split('"', 1)[0]
            cores[core] = cores.get(core, 0.0) + float(line.rpartition(" ")[2])
    return cores


def test_both_engine_cores_serve_the_defended_distribution(dp_server, tiny_pair):
    from distillgame.plugins.reference import ReferenceModels

    health = httpx.get(f"{dp_server.base_url}/health").json()
    assert (health["workers"], health["engine_cores"]) == (2, 2), health
    metrics = httpx.get(f"{dp_server.base_url}/metrics").text
    served_before = _per_core(metrics, "vllm:request_success_total")
    tokens_before = metric_sum(metrics, "distillgame_fidelity_tokens_total", mode="poe")

    client = openai.OpenAI(base_url=f"{dp_server.base_url}/v1", api_key="sk-test-standard", max_retries=0,
                           timeout=300)
    model = client.models.list().data[0].id
    prompts = [[5 + i, 40 + 3 * i, 90 + i, 200 - i] for i in range(12)]

    def one(prompt: list[int]):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0.0, logprobs=5,
                                      extra_body={"return_tokens_as_token_ids": True})
        lp = r.choices[0].logprobs
        ids = [int(t.split(":", 1)[1]) for t in lp.tokens]
        tops = [{int(t.split(":", 1)[1]): v for t, v in top.items()} for top in lp.top_logprobs]
        return prompt, ids, tops

    with cf.ThreadPoolExecutor(len(prompts)) as pool:  # at once, so that vLLM spreads them over both cores
        results = list(pool.map(one, prompts))

    metrics = httpx.get(f"{dp_server.base_url}/metrics").text
    served = _per_core(metrics, "vllm:request_success_total")
    per_core = {core: served[core] - served_before.get(core, 0.0) for core in served}
    assert sorted(per_core) == ["0", "1"] and all(n >= 1 for n in per_core.values()), per_core
    released = sum(len(ids) for _, ids, _ in results)
    assert metric_sum(metrics, "distillgame_fidelity_tokens_total", mode="poe") - tokens_before == released

    torch.set_num_threads(1)
    ref = ReferenceModels(*tiny_pair)
    worst = 0.0
    for prompt, ids, tops in results:
        for pos, top in enumerate(tops):
            defended = ref.next_token_logprobs(prompt + ids[:pos], {"mode": "poe", "gamma": GAMMA})
            assert ids[pos] == int(defended.argmax())
            worst = max(worst, max(abs(v - defended[t].item()) for t, v in top.items()))
    print(f"DP=2: {per_core} requests per engine core, worst |served - oracle| logprob {worst:.2e}")
    assert worst < TOL, worst
