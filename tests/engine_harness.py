"""What the vLLM engine tests share: starting runner subprocesses a few at a time, and the
measures both sides are compared on (greedy tokens, perplexity, teacher-forced top-1, the
spread of a perturbed simulator).

Each engine runs ``tests/vllm_runner.py`` in its own subprocess (see its docstring); the pool
keeps at most ``max_parallel`` alive (each holds 2-3 GB on CPU) and kills one that outlives
``timeout_s``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

RUNNER = Path(__file__).with_name("vllm_runner.py")
ENSEMBLE_SEEDS = (0, 1, 2)
#: Prompts for greedy comparisons (tests take the first n they can afford).
PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans",
    "The best way to learn a new language is",
    "Photosynthesis is the process by which",
    "My favorite recipe for pancakes",
    "The stock market today",
    "A haiku about the ocean:",
    "The theory of relativity states that",
    "To install Python packages, you can use",
    "The largest planet in our solar system",
    "Dear hiring manager, I am writing to",
    "The quick brown fox",
)


class EnginePool:
    """Runner subprocesses started from ``requests`` ({name: request dict}) as slots free up.

    Call :meth:`poll` now and then (it starts pending engines) and :meth:`wait` at the end;
    ``results[name]`` is ``{"rc", "stderr", "log", "out"}`` (``out`` the runner's JSON or None).
    """

    def __init__(self, requests: dict[str, dict], workdir: Path, *, max_parallel: int = 3,
                 timeout_s: float = 480, env: dict[str, str] | None = None) -> None:
        self.pending = list(requests)
        self.requests = requests
        self.workdir = Path(workdir)
        self.max_parallel = max_parallel
        self.timeout_s = timeout_s
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
                    **(env or {})}
        self.running: dict[str, tuple] = {}
        self.results: dict[str, dict] = {}
        self.poll()

    def _start(self, name: str) -> None:
        request = {**self.requests[name], "out": str(self.workdir / f"{name}.json")}
        req_path = self.workdir / f"{name}.request.json"
        req_path.write_text(json.dumps(request))
        stdout, stderr = self.workdir / f"{name}.stdout", self.workdir / f"{name}.stderr"
        with open(stdout, "w") as out, open(stderr, "w") as err:
            proc = subprocess.Popen([sys.executable, str(RUNNER), str(req_path)], stdout=out,
                                    stderr=err, env=self.env, cwd=str(RUNNER.parent.parent))
        self.running[name] = (proc, Path(request["out"]), stdout, stderr, time.perf_counter())

    def poll(self) -> None:
        for name, (proc, out, stdout, stderr, started) in list(self.running.items()):
            if proc.poll() is None:
                if time.perf_counter() - started < self.timeout_s:
                    continue
                proc.kill()
            rc = proc.wait()
            self.results[name] = {"rc": rc, "stderr": stderr.read_text(),
                                  "log": stdout.read_text() + stderr.read_text(),
                                  "out": json.loads(out.read_text()) if out.exists() else None}
            del self.running[name]
        while self.pending and len(self.running) < self.max_parallel:
            self._start(self.pending.pop(0))

    def wait(self) -> dict[str, dict]:
        while self.pending or self.running:
            self.poll()
            if self.running:
                time.sleep(1.0)
        return self.results


def engine_output(results: dict, name: str, quantization: str = "hadaquant") -> dict:
    r = results[name]
    assert r["rc"] == 0 and r["out"] is not None, f"vLLM run {name} failed:\n{r['log'][-6000:]}"
    assert r["out"]["quantization"] == quantization
    return r["out"]


def engine_ppl(out: dict) -> float:
    return math.exp(out["nll_sum"] / out["num_predicted"])


def kv_capacity_tokens(log: str) -> int:
    """The KV capacity vLLM logs at start-up ("KV cache size: 165,632 tokens")."""
    found = re.findall(r"KV cache size: ([\d,]+) tokens", log)
    assert found, "vLLM did not log its KV cache size"
    return int(found[-1].replace(",", ""))


def bad_model_section(stderr: str, name: str) -> str:
    """The traceback a runner printed for its bad model ``name``."""
    section = re.search(rf"=== bad model {name} ===\n(.*?)=== end {name} ===", stderr, re.S)
    assert section is not None, stderr[-6000:]
    return section.group(1)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    assert pairs and len(a) == len(b)
    return sum(x == y for x, y in pairs) / len(pairs)


@torch.inference_mode()
def greedy(model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy continuations without EOS stopping (vLLM side: ignore_eos), with HF's KV cache;
    prompts are batched only with prompts of the same length, so there is no padding."""
    result: list[list[int] | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    for rows in by_length.values():
        out = model(input_ids=torch.tensor([prompts[i] for i in rows]), use_cache=True)
        tokens = []
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        for i, row in zip(rows, torch.cat(tokens, dim=1).tolist()):
            result[i] = row
    return result


@torch.inference_mode()
def score(model, windows: torch.Tensor) -> dict:
    """Perplexity and the top-1 token at each position (teacher forced), like the runner."""
    nll, count, top1 = 0.0, 0, []
    for row in windows:
        logits = model(input_ids=row[None]).logits[0, :-1].float()
        nll += F.cross_entropy(logits, row[1:], reduction="sum").item()
        count += row.numel() - 1
        top1.append(logits.argmax(-1).tolist())
    return {"ppl": math.exp(nll / count), "top1": top1}


@torch.inference_mode()
def perturbed_scores(model, windows: torch.Tensor, seeds=ENSEMBLE_SEEDS) -> list[dict]:
    """Scores with the embedding table scaled by (1 + 1e-6 * noise): the spread of equally
    valid float32 realizations of a model with run-time quantization."""
    table = model.model.embed_tokens.weight
    original = table.clone()
    scores = []
    try:
        for seed in seeds:
            noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(seed))
            table.copy_(original * (1 + 1e-6 * noise))
            scores.append(score(model, windows))
    finally:
        table.copy_(original)
    return scores


def assert_within_spread(out: dict, sim: dict) -> None:
    """The engine's perplexity lies in the range of the simulator and its perturbed ensemble
    (widened by 3%), and its top-1 agreement with the simulator is at least 80% of the
    ensemble's own."""
    ppls = [sim["ppl"]] + [s["ppl"] for s in sim["ensemble"]]
    assert min(ppls) / 1.03 <= engine_ppl(out) <= max(ppls) * 1.03, (engine_ppl(out), ppls)
    self_agreement = min(agreement(s["top1"], sim["top1"]) for s in sim["ensemble"])
    assert agreement(out["top1"], sim["top1"]) >= 0.8 * self_agreement, (
        agreement(out["top1"], sim["top1"]), self_agreement)
