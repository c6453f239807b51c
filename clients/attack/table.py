"""Table 1 in one command: collect, distill every attacker, evaluate, tabulate.

For each teacher setting (undefended, PoE at gamma, ADS at lam/eps; a PoE setting may
name a proxy of its own, served by a server of its own):

1. collect training traces (sampled) and the teacher's test answers (greedy)
   through the endpoint, with the API key whose tier fixes that defense (and,
   once, the undefended teacher's traces on the validation split: the released
   adaptive protocol's L_val);
2. distill one student per attacker (``ATTACKERS``: passive, the two adaptive
   protocols, the two filters, and the placebo control on request) from the
   same traces, for each of S seeds (same data order, seed and steps);
3. score every student on the test split with ``distillgame eval``;
4. time every setting's generation on the same training prompts, in
   interleaved rounds (``time_cost``; see :func:`time_settings`);

then write ``table1.md``, ``table1.png`` (every attacker per setting), ``table1.json`` (per row: ``attackers: {NAME: {mean,
sem, n, dropped}}``, the ``strongest`` attacker, ``passive_acc``,
``adaptive_acc`` = the better adaptive protocol, ``rel_gain``, ``time_cost``;
``student_base_acc``, the exact ``command`` and the configuration) and, with
``--sweep``, the utility-leakage frontier ``frontier.png`` (passive against the
strongest attacker), into ``out``; traces, students and evaluations go to
``work`` (default ``out/runs``), which is not for committing.

By default it starts our own ``distillgame serve`` with a policy that gives one
key per setting; with ``base_url`` it attacks a running endpoint instead (each
setting then names its ``api_key``). Stages resume: finished traces, students
and evaluations found in ``work`` are reused.

Not for: the attack primitives themselves (``collect``, ``distill``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .collect import CollectConfig, collect, read_records
from .distill import DistillConfig, distill

log = logging.getLogger(__name__)

ZOO = Path(__file__).resolve().parents[2] / "bench" / "zoo"


# Each attacker is a DistillConfig override on the same traces. The strongest per
# setting is the one with the highest mean student accuracy (the placebo, a
# control, is not a candidate).
ATTACKERS: dict[str, dict[str, Any]] = {
    "passive": dict(mode="passive"),
    "adaptive-minibatch": dict(mode="adaptive", weighting="minibatch"),
    "adaptive-released": dict(mode="adaptive", weighting="released"),
    # Not in the defaults: the released protocol with the value negated (weights grow with
    # eq. 3's v). On the zoo's undefended traces it came closest to passive of the released
    # variants (bench/results/adaptive_controls.md); ask for it with --attackers.
    "adaptive-released-neg": dict(mode="adaptive", weighting="released", value_sign=-1),
    "filter-correct": dict(mode="passive", filters=["correct"]),
    "filter-degenerate": dict(mode="passive", filters=["degenerate"]),
    "placebo": dict(mode="adaptive", weighting="minibatch", placebo=True),
}
ADAPTIVE = ("adaptive-minibatch", "adaptive-released", "adaptive-released-neg")
CONTROLS = ("placebo",)
DEFAULT_ATTACKERS = [a for a in ATTACKERS if a not in CONTROLS and a != "adaptive-released-neg"]
# The frontier's points beyond Table 1's get these attackers only (sweep_seeds seeds).
SWEEP_ATTACKERS = ("passive", "filter-correct")
# The order cells are trained in, so that a run cut short has the most useful ones:
# passive everywhere first (Table 1's rows, then the frontier's), then rejection
# sampling, then the adaptive protocols (the slowest students).
PRIORITY = ("passive", "filter-correct", "adaptive-minibatch", "adaptive-released", "filter-degenerate",
            "adaptive-released-neg", "placebo")
PLATEAU_RULE = ("converged: the last {window} epochs raised the best validation accuracy (greedy, {n} {split} "
                "problems) by less than {gain:g} points; plateau epoch: the first at which the best so far gained "
                "less than {gain:g} points over the last {window} epochs")


def parse_attackers(spec: str | list[str], placebo: bool = False) -> list[str]:
    """``"passive,adaptive-released"`` -> attacker names in ``ATTACKERS`` order; passive is always in."""
    names = [a.strip() for a in (spec.split(",") if isinstance(spec, str) else spec) if a.strip()]
    unknown = set(names) - set(ATTACKERS)
    if unknown:
        raise ValueError(f"unknown attackers {sorted(unknown)}; choose from {list(ATTACKERS)}")
    wanted = set(names) | {"passive"} | ({"placebo"} if placebo else set())
    return [a for a in ATTACKERS if a in wanted]


def run_name(attacker: str, seed: int) -> str:
    return f"{attacker}-seed{seed}"


@dataclass
class Setting:
    """One teacher operating point: a name and the defense its tier fixes."""

    name: str
    defense: dict[str, Any]
    api_key: str | None = None  # only for an external endpoint
    # PoE only: a proxy folder of this setting's own (e.g. an early exit of the
    # teacher); None: the table's proxy. Our server holds one proxy, so such a
    # setting is collected and timed on a server started with it.
    proxy: str | None = None

    @property
    def label(self) -> str:
        mode = self.defense.get("mode", "none")
        if mode == "none":
            return "Standard"
        params = ", ".join(f"{k}={v}" for k, v in self.defense.items() if k != "mode")
        if self.proxy:
            params += f", proxy={Path(self.proxy).name}"
        return f"{mode.upper()} ({params})"


def parse_settings(spec: str) -> list[Setting]:
    """``"none;poe:gamma=0.65;ads:lam=0.05,eps=1e-4"`` -> settings."""
    out = []
    for part in filter(None, (s.strip() for s in spec.split(";"))):
        mode, _, params = part.partition(":")
        defense: dict[str, Any] = {"mode": mode}
        for kv in filter(None, params.split(",")):
            k, v = kv.split("=")
            defense[k.strip()] = float(v)
        name = mode if not params else f"{mode}-" + "-".join(f"{k}{v:g}" for k, v in defense.items() if k != "mode")
        out.append(Setting(name=name, defense=defense))
    return out


@dataclass
class TableConfig:
    out: Path  # table1.md, table1.json, table1.png, frontier.png
    work: Path | None = None  # traces, students, evaluations (default: out/runs)
    teacher: str | None = str(ZOO / "teacher")  # None: the server's embedded default
    proxy: str | None = str(ZOO / "proxy")
    student: str = str(ZOO / "student-base")
    # None with the zoo's proxy: the committed gradient of its loss on 64 holdout
    # solutions (bench/zoo/proxy-ads-grad.safetensors, made by `distillgame ads-grad`)
    ads_grad: str | None = None
    task: str = "gsm-symbolic-easy"
    # Representative points at similar teacher accuracy, as in the paper's Table 1:
    # on 200 validation problems (greedy) the zoo teacher scores 86.0% undefended,
    # 73.5% under PoE at the paper's gamma 0.65 and 73.0% under ADS at lam 0.75
    # (76.0% at 0.65, 59.0% at 1.0) with the committed proxy gradient below.
    settings: list[Setting] = field(
        default_factory=lambda: parse_settings("none;poe:gamma=0.65;ads:lam=0.75,eps=1e-4")
    )
    sweep: bool = False
    # The frontier's strengths (with the Table 1 points they give >= 5 per defense).
    # On the zoo, KL(released || teacher) per token is 0.094 at gamma 0.5, 0.25 at
    # 0.62 and 0.67 at 0.75 (PoE); 0.024 at lam 0.64, 0.17 at 1.28 and 0.70 at
    # 2.56 (ADS) (bench/results/calibrate_zoo); the largest lam is the candidate
    # poisoning point.
    sweep_gamma: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.8, 0.9])
    sweep_lam: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5, 2.5])
    seeds: int = 3
    n_train: int = 1000
    n_test: int = 500
    n_val: int = 32
    max_tokens: int = 256
    temperature: float = 1.0
    concurrency: int = 16
    # Distillation. The paper's recipe (DistillConfig's defaults: LoRA rank 128, lr
    # 5e-4, 3 epochs) suits a pretrained 3B student, and stays the default of
    # `attack distill`. The zoo's 192-wide student, trained from scratch, learns
    # fastest with full fine-tuning at lr 2e-3 (0.44 CPU-s per step; LoRA rank 64 at
    # lr 5e-3, 0.53 CPU-s per step, was still climbing at epoch 40). 60 epochs is
    # where Table 1's undefended passive students meet the plateau rule (mean curve:
    # plateau epoch 51); at 40 their mean curve was still gaining (43.2% -> 45.5%
    # over the last 10 epochs), though the defended rows had plateaued.
    rank: int = 64  # LoRA only
    lr: float = 2e-3
    epochs: float = 60.0
    lora: bool = False  # full fine-tuning (the zoo's student is small and trained from scratch)
    # Convergence: every student's greedy accuracy after each epoch on val_acc_n
    # problems of the task's val_acc_split (0: off), and the plateau rule applied to
    # the undefended passive students' curves.
    val_acc_n: int = 200
    val_acc_split: str = "holdout"
    # Window 10, not 3: on the zoo's 200-problem curves a 3-epoch window fired at
    # epoch 18 (full fine-tuning) and 9 (LoRA), each of which then gained 16+ points.
    plateau_window: int = 10
    plateau_min_gain: float = 0.01
    sweep_seeds: int = 2
    # Without training: the table from the cells already finished (n < seeds where
    # some are missing), labelled partial.
    partial: bool = False
    batch_size: int = 6
    grad_accum: int = 4
    max_length: int = 512
    rho: float = 0.1
    attackers: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKERS))
    placebo: bool = False  # also the placebo control (adaptive-minibatch with shuffled values)
    # The released protocol (the authors' defaults); its L_val is the undefended
    # teacher's traces on n_val_traces validation problems.
    beta: float = 0.5
    fd_eps: float = 0.01
    clip: float = 10.0
    n_val_traces: int = 128
    # Time cost: the same training prompts through every setting, in rounds
    # whose order rotates (see time_settings).
    timing_rounds: int = 3
    timing_prompts: int = 64
    # grad L_val is re-estimated every 4 optimizer steps: at every step it was 40%
    # of an adaptive step's time here (32 validation solutions, forward and backward).
    val_every: int = 4
    threads: int = 1  # torch threads per training process
    workers: int = 2  # students trained (and evaluated) at once, one process each
    # endpoint
    base_url: str | None = None
    serve_args: list[str] = field(
        default_factory=lambda: ["--max-model-len", "512", "--memory-share", "0.1", "--kv-cache-gib", "0.25"]
    )
    eval_args: list[str] = field(default_factory=lambda: ["--memory-share", "0.1", "--max-model-len", "512"])
    command: str = ""
    # Stop after the collections and the timing (the only stages that need the server).
    collect_only: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.work = Path(self.work) if self.work else self.out / "runs"
        self.settings = [s if isinstance(s, Setting) else Setting(**s) for s in self.settings]
        tags: dict[str, str] = {}  # a server's files in work are named after its proxy's folder
        for s in filter(lambda s: s.proxy, self.settings):
            if s.defense.get("mode") != "poe":  # ADS's gradient (ads_grad) is the table's proxy's
                raise ValueError(f"setting {s.name}: only a PoE setting may name a proxy of its own")
            if self.base_url is not None:
                raise ValueError(f"setting {s.name}: a proxy of its own needs our server, not --base-url")
            if tags.setdefault(proxy_tag(s.proxy), s.proxy) != s.proxy:
                raise ValueError(f"settings' proxies share the folder name {Path(s.proxy).name}")
        self.attackers = parse_attackers(self.attackers, self.placebo)
        zoo_grad = ZOO / "proxy-ads-grad.safetensors"
        if self.ads_grad is None and self.proxy == str(ZOO / "proxy") and zoo_grad.exists():
            self.ads_grad = str(zoo_grad)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TableConfig":
        data: dict[str, Any] = {}
        if args.config:
            text = Path(args.config).read_text()
            if str(args.config).endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        for key in ("teacher", "proxy", "student", "task", "seeds", "n_train", "n_test", "n_val", "max_tokens",
                    "epochs", "rank", "lr", "batch_size", "grad_accum", "max_length", "rho", "val_every", "workers",
                    "base_url", "beta", "fd_eps", "clip", "n_val_traces", "timing_rounds", "timing_prompts",
                    "val_acc_n", "sweep_seeds"):
            value = getattr(args, key, None)
            if value is not None:
                data[key] = None if value == "default" else value
        if args.settings:
            data["settings"] = parse_settings(args.settings)
        data["sweep"] = bool(args.sweep or data.get("sweep", False))
        data["collect_only"] = bool(getattr(args, "collect_only", False) or data.get("collect_only", False))
        data["partial"] = bool(getattr(args, "partial", False) or data.get("partial", False))
        if getattr(args, "full", False) and getattr(args, "lora", False):
            raise ValueError("give --full or --lora, not both")
        if getattr(args, "full", False) or getattr(args, "lora", False):
            data["lora"] = bool(getattr(args, "lora", False))
        if getattr(args, "attackers", None):
            data["attackers"] = args.attackers
        data["placebo"] = bool(getattr(args, "placebo", False) or data.get("placebo", False))
        if args.ads_grad:
            data["ads_grad"] = args.ads_grad
        data["out"] = args.out
        if args.work:
            data["work"] = args.work
        data["command"] = "distillgame " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        return cls(**data)

    def all_settings(self) -> list[Setting]:
        settings = list(self.settings)
        if self.sweep:
            settings += [Setting(f"poe-gamma{g:g}", {"mode": "poe", "gamma": g}) for g in self.sweep_gamma]
            if self.ads_grad:
                settings += [Setting(f"ads-lam{x:g}", {"mode": "ads", "lam": x, "eps": 1e-4}) for x in self.sweep_lam]
        unique: dict[str, Setting] = {}
        for s in settings:
            unique.setdefault(s.name, s)
        if not self.ads_grad and self.base_url is None:
            dropped = [s.name for s in unique.values() if s.defense.get("mode") == "ads"]
            if dropped:
                log.warning("no --ads-grad for the server: skipping ADS settings %s", dropped)
            unique = {k: s for k, s in unique.items() if s.defense.get("mode") != "ads"}
        if "none" not in unique:  # time cost is relative to the undefended teacher
            unique = {"none": Setting("none", {"mode": "none"}), **unique}
        return list(unique.values())


# ---------------------------------------------------------------- the server


def proxy_tag(proxy: str | None) -> str:
    """What names a server's files in ``work``: "" for the table's proxy, else "-" + the proxy's folder name."""
    return f"-{Path(proxy).name}" if proxy else ""


def server_groups(settings: list[Setting]) -> dict[str | None, list[Setting]]:
    """Settings by the server that collects them: None (the table's proxy) first, then each own proxy."""
    groups: dict[str | None, list[Setting]] = {None: []}
    for s in settings:
        groups.setdefault(s.proxy, []).append(s)
    return groups


def server_command(cfg: TableConfig, proxy: str | None, policy: Path, port: int) -> list[str]:
    """``distillgame serve`` for one server: the table's proxy and ADS gradient, or a setting's own proxy."""
    cmd = [sys.executable, "-m", "distillgame.cli", "serve", "--policy", str(policy), "--port", str(port),
           "--served-model-name", "teacher", *cfg.serve_args]
    if cfg.teacher:
        cmd += ["--teacher", cfg.teacher]
    if proxy:
        return cmd + ["--proxy", proxy]
    if cfg.proxy:
        cmd += ["--proxy", cfg.proxy]
    if cfg.ads_grad:
        cmd += ["--ads-grad", cfg.ads_grad]
    return cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_policy(path: Path, settings: list[Setting]) -> dict[str, str]:
    """One tier and one key per setting; returns setting name -> key."""
    lines, keys = [], {}
    for s in settings:
        params = ", ".join(f"{k} = {json.dumps(v)}" for k, v in s.defense.items())
        lines += [f'[tiers."{s.name}"]', f"defense = {{ {params} }}", "max_tokens = 4096",
                  "requests_per_minute = 1000000", ""]
        keys[s.name] = f"sk-attack-{s.name}"
    for s in settings:
        lines += ["[[keys]]", f'key = "{keys[s.name]}"', f'tier = "{s.name}"', ""]
    path.write_text("\n".join(lines))
    return keys


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the table process dies (Linux).

    The server runs in its own session (so a Ctrl-C reaches the table first and
    the table shuts the server down in order); without this, a table killed by
    SIGKILL or a timeout would leave the server and its engine running.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Server:
    """``distillgame serve`` as a subprocess, ready when /health answers 200."""

    def __init__(self, cfg: TableConfig, settings: list[Setting], proxy: str | None = None) -> None:
        self.port = _free_port()
        policy = cfg.work / f"policy{proxy_tag(proxy)}.toml"
        self.keys = write_policy(policy, settings)
        cmd = server_command(cfg, proxy, policy, self.port)
        self.log_path = cfg.work / f"server{proxy_tag(proxy)}.log"
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._wait_ready(timeout=600)

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.close()
        raise TimeoutError(f"server not ready after {timeout}s; see {self.log_path}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# ---------------------------------------------------------------- stages


def eval_student(model: str, cfg: TableConfig, out_dir: Path) -> float:
    """``distillgame eval`` in its own process: its vLLM engine and memory go away with it."""
    summary = out_dir / "summary.json"
    if not summary.exists():
        cmd = [sys.executable, "-m", "distillgame.cli", "eval", "--model", model, "--task", cfg.task,
               "--split", "test", "--n", str(cfg.n_test), "--max-tokens", str(cfg.max_tokens),
               "--out", str(out_dir), *cfg.eval_args]
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "eval.log", "w") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return float(json.loads(summary.read_text())["accuracy"])


def _endpoint(cfg: TableConfig, base_url: str, api_key: str) -> dict[str, Any]:
    """The CollectConfig fields every request of a setting shares."""
    return dict(base_url=base_url, api_key=api_key,
                model="teacher" if cfg.base_url is None else _first_model(base_url, api_key),
                task=cfg.task, max_tokens=cfg.max_tokens, concurrency=cfg.concurrency)


def fidelity_counters(base_url: str) -> dict[str, dict[str, float]] | None:
    """The server's cumulative fidelity counters per defense mode from ``/metrics``
    (``{mode: {"kl", "tokens", "agree"}}``), or None where the endpoint has none."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        text = httpx.get(f"{root}/metrics", timeout=30).text
    except httpx.HTTPError:
        return None
    names = {"distillgame_fidelity_kl_nats": "kl", "distillgame_fidelity_tokens": "tokens",
             "distillgame_fidelity_argmax_agree_tokens": "agree"}
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in names:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out.setdefault(sample.labels["mode"], {})[names[family.name]] = sample.value
    return out or None


def fidelity_delta(before: dict | None, after: dict | None, mode: str) -> dict[str, float] | None:
    """KL(released || teacher) per token and argmax agreement over one setting's requests: the
    counters of its defense mode after minus before (settings are collected one at a time)."""
    if not after or mode not in after:
        return None
    b = (before or {}).get(mode, {})
    tokens = after[mode].get("tokens", 0.0) - b.get("tokens", 0.0)
    if tokens <= 0:
        return None
    return {"tokens": tokens, "kl_per_token": (after[mode].get("kl", 0.0) - b.get("kl", 0.0)) / tokens,
            "argmax_agreement": (after[mode].get("agree", 0.0) - b.get("agree", 0.0)) / tokens}


def collect_setting(cfg: TableConfig, setting: Setting, base_url: str, api_key: str) -> dict:
    d = cfg.work / setting.name
    common = _endpoint(cfg, base_url, api_key)
    before = fidelity_counters(base_url)
    traces = collect(CollectConfig(split="train", n=cfg.n_train, out=d / "traces.jsonl",
                                   temperature=cfg.temperature, seed=0, **common))
    fidelity = fidelity_delta(before, fidelity_counters(base_url), setting.defense.get("mode", "none"))
    if fidelity is not None:
        (d / "fidelity.json").write_text(json.dumps(fidelity, indent=2))
    teacher = collect(CollectConfig(split="test", n=cfg.n_test, out=d / "teacher_test.jsonl",
                                    temperature=0.0, **common))
    out = {"traces": traces, "teacher": teacher}
    if setting.name == "none" and _needs_val_traces(cfg):
        # Sampled like the training traces, on problems none of them uses.
        out["val_traces"] = collect(CollectConfig(split="validation", n=cfg.n_val_traces, out=d / "val_traces.jsonl",
                                                  temperature=cfg.temperature, seed=1_000_003, **common))
    return out


def _timing_path(cfg: TableConfig, proxy: str | None = None) -> Path:
    return cfg.work / f"timing{proxy_tag(proxy)}" / "timing.json"


def _timed_settings(group: list[Setting], proxy: str | None) -> list[Setting]:
    """What one server times: its settings, and on a server of a setting's own proxy also ``none``,
    the undefended teacher their time cost is relative to (the table's server has it among its settings)."""
    return group if proxy is None else [Setting("none", {"mode": "none"}), *group]


def _timed(cfg: TableConfig, settings: list[Setting]) -> dict[str, dict[str, float]] | None:
    """Every server's finished timing pass (see :func:`_timed_on`) in one dict, else None.

    A setting timed on a server of its own proxy carries that server's ``none`` as its ``baseline``.
    """
    timing: dict[str, dict[str, float]] = {}
    for proxy, group in server_groups(settings).items():
        part = _timed_on(cfg, _timed_settings(group, proxy), proxy)
        if part is None:
            return None
        timing.update({s.name: part[s.name] if proxy is None else {**part[s.name], "baseline": part["none"]}
                       for s in group})
    return timing


def _timed_on(cfg: TableConfig, settings: list[Setting], proxy: str | None) -> dict[str, dict[str, float]] | None:
    """A finished timing pass over these settings (or more) at these sizes on the server of ``proxy``, else None.

    A table without ``--sweep`` reuses the sweep's pass (its settings are a
    subset), so the two share one server start and one set of rounds.
    """
    path = _timing_path(cfg, proxy)
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    covers = (set(s.name for s in settings) <= set(saved.get("settings", [])) and saved.get("rounds") == cfg.timing_rounds
              and saved.get("prompts") == cfg.timing_prompts)
    return {s.name: saved["per_setting"][s.name] for s in settings} if covers else None


def time_settings(cfg: TableConfig, settings: list[Setting], base_url: str, keys: dict[str, str],
                  proxy: str | None = None) -> dict[str, dict[str, float]]:
    """Generation time per setting, what ``time_cost`` is computed from: {name: {wall_s, tokens}}.

    The collections run one setting after another, so whatever load comes and
    goes (the engine's warm-up, other work on the machine) lands on one setting
    only. Here each of ``timing_rounds`` rounds sends the same
    ``timing_prompts`` training prompts through every setting, at the
    collections' concurrency and temperature, in an order that rotates each
    round; walls and completion tokens are summed per setting.
    """
    import shutil

    root = _timing_path(cfg, proxy).parent
    shutil.rmtree(root, ignore_errors=True)
    common = {s.name: _endpoint(cfg, base_url, keys[s.name]) for s in settings}
    # One untimed pass first: a resumed table may be timing a server that has served nothing yet.
    for s in settings:
        collect(CollectConfig(split="train", n=min(8, cfg.timing_prompts), out=root / "warmup" / f"{s.name}.jsonl",
                              temperature=cfg.temperature, seed=0, **common[s.name]))
    totals = {s.name: {"wall_s": 0.0, "tokens": 0} for s in settings}
    for r in range(cfg.timing_rounds):
        k = r % len(settings)
        for s in settings[k:] + settings[:k]:
            summary = collect(CollectConfig(split="train", n=cfg.timing_prompts, out=root / f"round{r}" / f"{s.name}.jsonl",
                                            temperature=cfg.temperature, seed=r, **common[s.name]))
            totals[s.name]["wall_s"] += summary["wall_s_this_run"]
            totals[s.name]["tokens"] += summary["completion_tokens"]
    _timing_path(cfg, proxy).write_text(json.dumps({"settings": [s.name for s in settings],
                                                    "rounds": cfg.timing_rounds, "prompts": cfg.timing_prompts,
                                                    "per_setting": totals}, indent=2))
    return totals


def time_costs(timing: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per setting: wall time relative to ``none`` (``time_cost``), and the same per generated token.

    A setting timed on a server of its own carries that server's ``none`` as its ``baseline``.
    """
    out = {}
    for name, t in timing.items():
        none = t.get("baseline", timing["none"])
        per_token_none = none["wall_s"] / max(1, none["tokens"])
        out[name] = {"time_cost": t["wall_s"] / none["wall_s"],
                     "time_cost_per_token": (t["wall_s"] / max(1, t["tokens"])) / per_token_none}
    return out


def _needs_val_traces(cfg: TableConfig) -> bool:
    return any(ATTACKERS[a].get("weighting") == "released" for a in cfg.attackers)


def val_traces_path(cfg: TableConfig) -> Path:
    return cfg.work / "none" / "val_traces.jsonl"


def _collected(cfg: TableConfig, setting: Setting) -> dict | None:
    """The summaries of a finished collection (a rerun skips the server for it), else None."""
    d = cfg.work / setting.name
    out = {}
    wanted = [("traces", "traces.jsonl", cfg.n_train), ("teacher", "teacher_test.jsonl", cfg.n_test)]
    if setting.name == "none" and _needs_val_traces(cfg):
        wanted.append(("val_traces", "val_traces.jsonl", cfg.n_val_traces))
    for key, name, n in wanted:
        path = d / f"{name}.summary.json"
        if not path.exists():
            return None
        summary = json.loads(path.read_text())
        if summary["n_records"] < n:
            return None
        out[key] = summary
    return out


def _first_model(base_url: str, api_key: str) -> str:
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key).models.list().data[0].id


def cell_config(cfg: TableConfig, attacker: str, seed: int, out: Path) -> DistillConfig:
    """The student of one (attacker, seed) cell: the table's recipe plus the attacker's weights/filters."""
    return DistillConfig(student=cfg.student, out=out, rho=cfg.rho, val_every=cfg.val_every, rank=cfg.rank,
                         lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                         max_length=cfg.max_length, seed=seed, beta=cfg.beta, fd_eps=cfg.fd_eps, clip=cfg.clip,
                         lora=cfg.lora, val_acc_task=cfg.task if cfg.val_acc_n else None,
                         val_acc_split=cfg.val_acc_split, val_acc_n=cfg.val_acc_n or 200, **ATTACKERS[attacker])


def cell_key(cfg: TableConfig, attacker: str, seed: int) -> dict[str, Any]:
    """What a cell's result depends on besides its traces: its student's configuration
    (paths aside) and the test set. A saved cell with another key is not reused."""
    dcfg = dataclasses.asdict(cell_config(cfg, attacker, seed, Path(".")))
    dcfg.pop("out")
    dcfg["student"] = Path(cfg.student).name
    return {"distill": dcfg, "task": cfg.task, "n_test": cfg.n_test, "max_tokens": cfg.max_tokens}


def cell_path(cfg: TableConfig, setting: Setting, attacker: str, seed: int) -> Path:
    """A finished cell's small result file, under ``out`` (committed; the weights stay in ``work``)."""
    return cfg.out / "table1_cells" / setting.name / f"{run_name(attacker, seed)}.json"


def load_cell(cfg: TableConfig, setting: Setting, attacker: str, seed: int) -> dict[str, Any] | None:
    path = cell_path(cfg, setting, attacker, seed)
    if not path.exists():
        return None
    cell = json.loads(path.read_text())
    return cell if cell.get("key") == cell_key(cfg, attacker, seed) else None


def train_and_score(cfg: TableConfig, setting: Setting, attacker: str, seed: int) -> dict[str, Any]:
    """One cell of the table: distill a student (unless already done), score it on the test split;
    returns ``{"acc", "dropped", "learning_curve", ...}`` and saves it as the cell's result file,
    which a later run reuses (so a table resumes from ``out`` even without ``work``)."""
    import torch

    cached = load_cell(cfg, setting, attacker, seed)
    if cached is not None:
        return cached
    torch.set_num_threads(cfg.threads)
    d = cfg.work / setting.name
    run = d / run_name(attacker, seed)
    if not (run / "summary.json").exists():
        dcfg = cell_config(cfg, attacker, seed, run)
        released = dcfg.mode == "adaptive" and dcfg.weighting == "released"
        distill(dcfg, d / "traces.jsonl", val_task=cfg.task, val_split="validation", val_n=cfg.n_val,
                val_traces=val_traces_path(cfg) if released else None)
    summary = json.loads((run / "summary.json").read_text())
    from .distill import converged_by, plateau_epoch

    curve_accs = [c["val_acc"] for c in summary.get("learning_curve") or []]
    cell = {
        "acc": eval_student(str(run / "merged"), cfg, run / "eval"),
        "dropped": sum((summary.get("dropped") or {}).values()),
        "n_test": cfg.n_test,
        "learning_curve": summary.get("learning_curve") or [],
        "plateau_epoch": plateau_epoch(curve_accs, cfg.plateau_window, cfg.plateau_min_gain),
        "converged": converged_by(curve_accs, cfg.plateau_window, cfg.plateau_min_gain),
        "steps": summary["steps"],
        "train_s": summary.get("train_s", summary["wall_s"]),
        "val_eval_s": summary.get("val_eval_s", 0.0),
        "key": cell_key(cfg, attacker, seed),
    }
    path = cell_path(cfg, setting, attacker, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell, indent=1))
    return cell


def table_cells(cfg: TableConfig, settings: list[Setting]) -> list[tuple[Setting, str, int]]:
    """Every (setting, attacker, seed) cell to fill, in ``PRIORITY`` order: Table 1's rows get
    every attacker and ``seeds`` seeds; the frontier's other points ``SWEEP_ATTACKERS`` and
    ``sweep_seeds`` seeds."""
    main = {s.name for s in cfg.settings} | {"none"}
    cells = []
    for a in sorted(cfg.attackers, key=PRIORITY.index):
        for in_table in (True, False):
            for seed in range(cfg.seeds):
                for s in settings:
                    if (s.name in main) != in_table:
                        continue
                    if not in_table and (a not in SWEEP_ATTACKERS or seed >= cfg.sweep_seeds):
                        continue
                    cells.append((s, a, seed))
    return cells


def distill_all(cfg: TableConfig, settings: list[Setting]) -> dict[str, dict[str, list[dict[str, Any] | None]]]:
    """Every cell of ``table_cells``, ``cfg.workers`` at a time in their own processes
    (with ``cfg.partial``: only those already finished, nothing is trained).

    Cells are independent (each seeds itself and trains on one thread), so the
    results do not depend on how many run at once. Processes are spawned, not
    forked: the parent may hold torch and HTTP state that must not be copied.
    Returns ``{setting: {attacker: [cell or None per seed]}}``.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    as_passive: dict[tuple[str, str], str] = {}
    for s in settings:
        for a in cfg.attackers:
            if filters_drop_nothing(cfg, s, a):
                as_passive[(s.name, a)] = "its filters drop no trace"
            elif released_weights_uniform(cfg, s, a):
                as_passive[(s.name, a)] = "its weights are all equal"
    for (name, a), why in sorted(as_passive.items()):
        log.info("%s %s: %s, so its students are passive's (not trained again)", name, a, why)
    cells = [(s, a, seed) for s, a, seed in table_cells(cfg, settings) if (s.name, a) not in as_passive]
    out: dict[str, dict[str, list[Any]]] = {s.name: {a: [None] * cfg.seeds for a in cfg.attackers} for s in settings}
    todo = []
    for s, a, seed in cells:
        done = load_cell(cfg, s, a, seed)
        if done is not None:
            out[s.name][a][seed] = done
        elif not cfg.partial:
            todo.append((s, a, seed))
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, cfg.workers), mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(train_and_score, cfg, s, a, seed): (s, a, seed) for s, a, seed in todo}
            for fut in tqdm(as_completed(futures), total=len(futures), desc="students", unit="student"):
                s, a, seed = futures[fut]
                out[s.name][a][seed] = fut.result()
                log.info("%s %s seed %d: accuracy %.3f", s.name, a, seed, out[s.name][a][seed]["acc"])
    for (name, a), why in as_passive.items():
        out[name][a] = [None if c is None else {**c, "dropped": 0, "as_passive": True, "as_passive_why": why}
                        for c in out[name]["passive"]]
    return out  # type: ignore[return-value]


def filters_drop_nothing(cfg: TableConfig, setting: Setting, attacker: str) -> bool:
    """Whether ``attacker`` only filters and its filters keep every trace of ``setting``.

    Such a student trains on passive's examples, in passive's order, from
    passive's seed: it is passive's student bit for bit (tested), so the table
    reuses passive's cells for it instead of training it again.
    """
    spec = ATTACKERS[attacker]
    if spec.get("mode") != "passive" or not spec.get("filters"):
        return False
    from transformers import AutoTokenizer

    from .distill import load_traces

    tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    _, dropped = load_traces(cfg.work / setting.name / "traces.jsonl", tokenizer, cfg.max_length, spec["filters"])
    return not any(dropped.values())


def released_weights_uniform(cfg: TableConfig, setting: Setting, attacker: str) -> bool:
    """Whether ``attacker`` is the released protocol and its fixed weights on ``setting``'s
    traces are all equal (every value ``a`` beyond the clip on the same side, as under full
    fine-tuning of the zoo's student, where ``|a|`` exceeds 10 on every trace).

    Such a student trains with weights of exactly 1 on passive's examples, in passive's
    order, from passive's seed: it is passive's student bit for bit (tested). Only under
    full fine-tuning, where theta_0 (and so ``a``) is the same for every seed; with LoRA
    the adapters' initialization is the seed's. The values are computed once per setting:
    per trace in ``WORK/SETTING/released-values.jsonl``, their statistics next to the
    cells (``OUT/table1_cells/SETTING/released-values.json``, which a partial table reads).
    """
    spec = ATTACKERS[attacker]
    if cfg.lora or spec.get("weighting") != "released" or spec.get("placebo"):
        return False
    d = cfg.work / setting.name
    stats_path = cfg.out / "table1_cells" / setting.name / "released-values.json"
    key = cell_key(cfg, attacker, 0)
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    if stats is None or stats.get("key") != key:
        if not (d / "traces.jsonl").exists():
            return False  # partial, traces gone: the cells decide
        from .distill import values

        log.info("%s: the released protocol's values at theta_0 (one pass over %s)", setting.name, d / "traces.jsonl")
        stats = values(cell_config(cfg, attacker, 0, d), d / "traces.jsonl", d / "released-values.jsonl",
                       val_traces=val_traces_path(cfg), val_task=cfg.task, val_split="validation", val_n=cfg.n_val)
        stats["key"] = key
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        stats_path.write_text(json.dumps(stats, indent=1))
    log.info("%s %s: values in [%.3g, %.3g], %.0f%% beyond the clip of %g, weights in [%.6g, %.6g]", setting.name,
             attacker, stats["a_min"], stats["a_max"], 100 * stats["frac_clipped"], cfg.clip, stats["w_min"],
             stats["w_max"])
    return stats["w_min"] == stats["w_max"] == 1.0


def aggregate_attackers(cells: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One row's attacker columns from its cells ``{attacker: [{"acc", "dropped"} per seed]}``.

    Returns ``attackers`` ({NAME: {mean, sem, n, dropped}}), ``strongest`` (the
    highest mean accuracy, controls excluded, the first listed on a tie),
    ``adaptive`` (the better adaptive protocol, or None), ``passive_acc``,
    ``adaptive_acc`` and ``rel_gain`` (adaptive / passive - 1).
    """
    cells = {a: [c for c in runs if c is not None] for a, runs in cells.items()}
    attackers = {
        a: {**mean_sem([c["acc"] for c in runs]), "dropped": max(c["dropped"] for c in runs),
            **({"as_passive": True, "as_passive_why": runs[0].get("as_passive_why", "its filters drop no trace")}
               if all(c.get("as_passive") for c in runs) else {})}
        for a, runs in cells.items() if runs
    }
    candidates = [a for a in attackers if a not in CONTROLS]
    strongest = max(candidates, key=lambda a: attackers[a]["mean"])
    adaptive = [a for a in ADAPTIVE if a in attackers]
    best = max(adaptive, key=lambda a: attackers[a]["mean"]) if adaptive else None
    passive = {k: attackers["passive"][k] for k in ("mean", "sem", "n")}
    adaptive_acc = {k: attackers[best][k] for k in ("mean", "sem", "n")} if best else None
    gain = adaptive_acc["mean"] / passive["mean"] - 1.0 if adaptive_acc and passive["mean"] > 0 else None
    return {"attackers": attackers, "strongest": strongest, "adaptive": best, "passive_acc": passive,
            "adaptive_acc": adaptive_acc, "rel_gain": gain}


# ---------------------------------------------------------------- the table


def mean_sem(xs: list[float]) -> dict[str, float | int]:
    n = len(xs)
    mean = sum(xs) / n
    sem = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else 0.0
    return {"mean": mean, "sem": sem, "n": n}


def _why_passive(attacker: dict[str, Any]) -> str:
    why = attacker.get("as_passive_why", "its filters drop no trace")
    return "0 dropped" if why == "its filters drop no trace" else "equal weights"


def _pct(m: dict) -> str:
    return f"{100 * m['mean']:.2f}% ± {100 * m['sem']:.2f}"


def write_markdown(path: Path, result: dict) -> None:
    base = result["student_base_acc"]
    conv = result.get("convergence")
    rows = [
        f"# Table 1 ({result['config']['task']}, {result['config']['seeds']} seeds)"
        + (f" — PARTIAL: {result['missing_cells']} cells not finished, n = seeds done" if result.get("partial") else ""),
        "",
        f"Student base accuracy: {'n/a' if base is None else f'{100 * base:.2f}%'}",
        "",
    ]
    if conv:
        rows += [f"Epochs: {conv['epochs']:g}. Plateau rule: {conv['rule']}. Plateau epoch of the mean passive curve: "
                 + ", ".join(f"{k}: {v if v is not None else 'not reached'}" for k, v in conv["plateau_epoch"].items())
                 + ".", ""]
    rows += [
        "| Teacher | Teacher Acc. ↑ | Passive Acc. ↓ | Adaptive Acc. ↓ | Rel. Gain | Strongest attacker | Time Cost |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        gain = "n/a" if r["rel_gain"] is None else f"{100 * r['rel_gain']:.2f}%"
        adaptive = "n/a" if r["adaptive_acc"] is None else f"{_pct(r['adaptive_acc'])} ({r['adaptive']})"
        strongest = f"{r['strongest']}: {_pct(r['attackers'][r['strongest']])}"
        rows.append(f"| {r['label']} | {_pct(r['teacher_acc'])} | {_pct(r['passive_acc'])} | "
                    f"{adaptive} | {gain} | {strongest} | {r['time_cost']:.2f}× |")
    names = list(dict.fromkeys(a for r in result["rows"] for a in r["attackers"]))
    rows += ["", "Every attacker (student accuracy, n = seeds; traces its filters dropped):", "",
             "| Teacher | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for r in result["rows"]:
        cells = ["–" if a not in r["attackers"] else
                 f"{_pct(r['attackers'][a])} (n={r['attackers'][a]['n']})"
                 + (f" (-{r['attackers'][a]['dropped']})" if r["attackers"][a]["dropped"]
                 else f" (= passive: {_why_passive(r['attackers'][a])})" if r["attackers"][a].get("as_passive")
                 else "") for a in names]
        rows.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    rows += ["", "Accuracies: mean ± standard error over seeds (teacher: one greedy pass, sem = sqrt(p(1-p)/n)).",
             "Adaptive = the better of the two adaptive protocols (minibatch: eq. 3 tilted per minibatch; released: "
             "the authors' fixed weights from theta_0). Rel. gain = adaptive / passive - 1. Strongest = the attacker "
             "with the highest mean (the placebo control excluded). Time cost = wall time of generation relative to "
             f"the undefended teacher, summed over {result['config']['timing_rounds']} interleaved rounds of the same "
             f"{result['config']['timing_prompts']} training prompts per setting (same concurrency, order rotated "
             "each round).", "",
             f"Command: `{result['command']}`", ""]
    path.write_text("\n".join(rows))


def _strongest_acc(row: dict) -> dict:
    """The strongest attacker's accuracy of a row (older rows: the adaptive column)."""
    if "strongest" in row:
        return row["attackers"][row["strongest"]]
    return row["adaptive_acc"]


def draw_frontier(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault(r["defense"].get("mode", "none"), []).append(r)
    colors = {"none": "black", "poe": "tab:blue", "ads": "tab:red"}
    for mode, rs in families.items():
        rs = sorted(rs, key=lambda r: r["teacher_acc"]["mean"])
        x = [100 * r["teacher_acc"]["mean"] for r in rs]
        for kind, style in (("passive", "--o"), ("strongest", "-s")):
            accs = [_strongest_acc(r) if kind == "strongest" else r["passive_acc"] for r in rs]
            y = [100 * a["mean"] for a in accs]
            e = [100 * a["sem"] for a in accs]
            ax.errorbar(x, y, yerr=e, fmt=style, color=colors.get(mode, "gray"), capsize=3,
                        label=f"{mode} / {kind}")
    ax.set_xlabel("teacher accuracy (%)  → utility")
    ax.set_ylabel("student accuracy (%)  → leakage")
    ax.set_title("Utility-leakage frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def draw_attackers(path: Path, rows: list[dict]) -> None:
    """Table 1 as a picture: per teacher setting, every attacker's student accuracy (mean ± s.e.)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(a for r in rows for a in r["attackers"]))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows) * max(1, len(names)) / 4, 4))
    for i, name in enumerate(names):
        x = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
        y = [100 * r["attackers"][name]["mean"] if name in r["attackers"] else 0.0 for r in rows]
        e = [100 * r["attackers"][name]["sem"] if name in r["attackers"] else 0.0 for r in rows]
        ax.bar(x, y, width, yerr=e, capsize=2, label=name)
    for j, r in enumerate(rows):  # the strongest attacker of each setting, marked above its bar
        k = names.index(r["strongest"])
        ax.annotate("★", (j + (k - (len(names) - 1) / 2) * width, 100 * r["attackers"][r["strongest"]]["mean"]),
                    ha="center", va="bottom", xytext=(0, 6), textcoords="offset points")
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
    ax.set_ylabel("student test accuracy (%)  → leakage")
    ax.set_title("Table 1: every attacker per teacher setting (★ strongest)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def learning_curves(cells: dict[str, dict[str, list[dict | None]]], attacker: str = "passive") -> dict[str, Any]:
    """Per setting, ``attacker``'s greedy validation accuracy after each epoch: every seed's
    curve and their mean over the epochs all seeds reached (the learning-curve figure's data)."""
    out: dict[str, Any] = {}
    for name, by_attacker in cells.items():
        runs = [c["learning_curve"] for c in by_attacker.get(attacker, []) if c and c.get("learning_curve")]
        if not runs:
            continue
        n_epochs = min(len(r) for r in runs)
        out[name] = {
            "epochs": [r["epoch"] for r in runs[0][:n_epochs]],
            "seeds": [[r["val_acc"] for r in run] for run in runs],
            "mean": [sum(run[e]["val_acc"] for run in runs) / len(runs) for e in range(n_epochs)],
            "n_val": runs[0][0]["n"],
        }
    return out


def convergence(cfg: TableConfig, curves: dict[str, Any]) -> dict[str, Any]:
    """The epoch count, the plateau rule and where each setting's mean passive curve meets it;
    ``converged`` is whether the undefended passive students plateaued within the epochs trained."""
    from .distill import converged_by, plateau_epoch

    rule = PLATEAU_RULE.format(n=cfg.val_acc_n, split=cfg.val_acc_split, gain=100 * cfg.plateau_min_gain,
                               window=cfg.plateau_window)
    plateau = {name: plateau_epoch(c["mean"], cfg.plateau_window, cfg.plateau_min_gain) for name, c in curves.items()}
    converged = {name: converged_by(c["mean"], cfg.plateau_window, cfg.plateau_min_gain) for name, c in curves.items()}
    return {"epochs": cfg.epochs, "rule": rule, "window": cfg.plateau_window, "min_gain": cfg.plateau_min_gain,
            "plateau_epoch": plateau, "converged_by_setting": converged, "converged": converged.get("none", False)}


def draw_learning_curves(path: Path, curves: dict[str, Any], labels: dict[str, str], plateau: dict[str, Any]) -> None:
    """Passive students' validation accuracy against epoch, one line per setting (seeds thin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i}"
        for seed in c["seeds"]:
            ax.plot(c["epochs"][: len(seed)], [100 * a for a in seed[: len(c["epochs"])]], color=color, alpha=0.25, lw=0.8)
        ax.plot(c["epochs"], [100 * a for a in c["mean"]], color=color, lw=2,
                label=f"{labels.get(name, name)} (n={len(c['seeds'])})")
        if plateau.get(name):
            e = plateau[name]
            ax.plot([e], [100 * c["mean"][e - 1]], "v", color=color, ms=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"passive student validation accuracy (%, greedy, n={next(iter(curves.values()))['n_val']})")
    ax.set_title("Learning curves (▼ plateau by the rule)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _collection_path(cfg: TableConfig, setting: Setting) -> Path:
    return cfg.out / "table1_cells" / setting.name / "collection.json"


def _serve(cfg: TableConfig, proxy: str | None, group: list[Setting], collected: dict[str, dict]) -> None:
    """On one server, started with ``proxy`` (None: the table's), collect ``group``'s settings
    missing from ``collected`` (filled in) and time them where that server has no timing pass yet."""
    timed = _timed_settings(group, proxy)
    todo = [s for s in group if s.name not in collected]
    timing = _timed_on(cfg, timed, proxy)
    if not todo and timing is not None:
        return
    server = Server(cfg, timed, proxy) if cfg.base_url is None else None
    base_url = server.base_url if server else cfg.base_url
    keys = server.keys if server else {s.name: s.api_key or "EMPTY" for s in timed}
    try:
        for s in todo:
            log.info("collecting %s through %s", s.name, base_url)
            collected[s.name] = collect_setting(cfg, s, base_url, keys[s.name])
        if timing is None:
            log.info("timing %d settings: %d interleaved rounds of %d prompts", len(timed), cfg.timing_rounds,
                     cfg.timing_prompts)
            time_settings(cfg, timed, base_url, keys, proxy)
    finally:
        if server:
            server.close()  # frees the engine's memory for training and evaluation


def run_table(cfg: TableConfig) -> dict:
    cfg.out.mkdir(parents=True, exist_ok=True)
    cfg.work.mkdir(parents=True, exist_ok=True)
    settings = cfg.all_settings()
    t_start = time.perf_counter()

    collected: dict[str, dict] = {s.name: done for s in settings if (done := _collected(cfg, s)) is not None}
    if cfg.partial:  # from the committed summaries where the traces are gone
        for s in settings:
            if s.name not in collected and _collection_path(cfg, s).exists():
                collected[s.name] = json.loads(_collection_path(cfg, s).read_text())
        settings = [s for s in settings if s.name in collected]
    timing = _timed(cfg, settings)
    if cfg.partial and timing is None and (cfg.out / "table1_cells" / "timing.json").exists():
        timing = json.loads((cfg.out / "table1_cells" / "timing.json").read_text())
    if timing is None or len(collected) < len(settings):
        for proxy, group in server_groups(settings).items():
            _serve(cfg, proxy, group, collected)
        timing = _timed(cfg, settings)
    for s in settings:
        fidelity = cfg.work / s.name / "fidelity.json"
        if fidelity.exists():
            collected[s.name]["fidelity"] = json.loads(fidelity.read_text())
        _collection_path(cfg, s).parent.mkdir(parents=True, exist_ok=True)
        _collection_path(cfg, s).write_text(json.dumps(collected[s.name], indent=1))
    (cfg.out / "table1_cells" / "timing.json").write_text(json.dumps(timing, indent=1))
    if cfg.collect_only:
        return {"collected": {name: c["teacher"]["accuracy"] for name, c in collected.items()}, "timing": timing}

    base_summary = cfg.work / "student-base" / "eval" / "summary.json"
    base_acc = None if cfg.partial and not base_summary.exists() else eval_student(
        cfg.student, cfg, cfg.work / "student-base" / "eval")
    accs = distill_all(cfg, settings)

    costs = time_costs(timing)
    rows = []
    for s in settings:
        if not any(accs[s.name]["passive"]):
            continue  # partial: no passive student yet
        c = collected[s.name]
        t = c["teacher"]
        p = t["accuracy"]
        agg = aggregate_attackers(accs[s.name])
        done = {a: [x["acc"] for x in cells if x] for a, cells in accs[s.name].items()}
        rows.append({
            "teacher": s.name,
            "label": s.label,
            "defense": s.defense,
            "teacher_acc": {"mean": p, "sem": math.sqrt(p * (1 - p) / t["n_records"]), "n": t["n_records"]},
            **agg,
            "runs": {a: accs_ for a, accs_ in done.items() if accs_},
            "passive_runs": done["passive"],
            "adaptive_runs": done[agg["adaptive"]] if agg["adaptive"] else None,
            **costs[s.name],
            "timing": timing[s.name],
            "fidelity": c.get("fidelity"),
            "trace_accuracy": c["traces"]["accuracy"],
            "trace_tokens": c["traces"]["completion_tokens"],
            "student_minutes": {a: [round(x["train_s"] / 60, 2) for x in cells if x] for a, cells in accs[s.name].items()
                                if any(cells)},
        })
    curves = learning_curves(accs)
    conv = convergence(cfg, curves)
    missing = sum(accs[s.name][a][seed] is None for s, a, seed in table_cells(cfg, settings)
                  if not (a != "passive" and ATTACKERS[a].get("filters") and filters_drop_nothing(cfg, s, a)))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    result = {
        "partial": bool(missing),
        "missing_cells": missing,
        "student_base_acc": base_acc,
        "command": cfg.command,
        "convergence": conv,
        "rows": rows,
        "config": config,
        "wall_s": time.perf_counter() - t_start,
    }
    main = [r for r in rows if r["teacher"] in {s.name for s in cfg.settings} | {"none"}]
    table = {**result, "rows": main}
    (cfg.out / "table1.json").write_text(json.dumps(table, indent=2))
    write_markdown(cfg.out / "table1.md", table)
    draw_attackers(cfg.out / "table1.png", main)
    labels = {s.name: s.label for s in settings}
    main_curves = {k: v for k, v in curves.items() if k in {r["teacher"] for r in main}}
    (cfg.out / "learning_curve.json").write_text(json.dumps({"convergence": conv, "curves": curves}, indent=1))
    if main_curves:
        draw_learning_curves(cfg.out / "learning_curve.png", main_curves, labels, conv["plateau_epoch"])
    out = {"markdown": str(cfg.out / "table1.md"), "json": str(cfg.out / "table1.json"),
           "png": str(cfg.out / "table1.png"), **table}
    if cfg.sweep:
        (cfg.out / "frontier.json").write_text(json.dumps(result, indent=2))
        draw_frontier(cfg.out / "frontier.png", rows)
        out["frontier"] = str(cfg.out / "frontier.png")
    return out
