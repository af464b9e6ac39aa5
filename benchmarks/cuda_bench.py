"""Shared pieces of the GPU benchmark scripts (gemm_bench, hadamard_quant_bench, paged_attention_bench).

* :func:`import_kernels` finds ``hq_vllm.kernels`` installed, or loads it straight from the checkout
  (``kernels/`` is mapped to ``hq_vllm.kernels`` by pyproject.toml's package-dir), so the scripts
  run on the GPU machine with nothing installed.
* :func:`hbm_copy_bandwidth` is the roofline every "% HBM" is measured against.
* :func:`graph_time` times calls replayed as one CUDA graph (kernel plus launch gap, no Python);
  :func:`wall_time` is its stand-in for ``--dry-run`` on a CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def import_kernels(*names: str) -> tuple:
    """The modules ``hq_vllm.kernels.<name>`` for each name, installed or from the checkout."""
    try:
        return tuple(importlib.import_module(f"hq_vllm.kernels.{n}") for n in names)
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    import hq_vllm  # noqa: F401  (cheap: imports neither torch nor vllm)

    spec = importlib.util.spec_from_file_location(
        "hq_vllm.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["hq_vllm.kernels"] = module
    spec.loader.exec_module(module)
    return tuple(importlib.import_module(f"hq_vllm.kernels.{n}") for n in names)


def hbm_copy_bandwidth(device="cuda") -> float:
    """GB/s of a 2 GiB device-to-device copy, read + written bytes, median of 20 (CUDA only)."""
    src = torch.randn(1 << 29, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 29) * 4 / statistics.median(times) / 1e9


def graph_time(fn, count: int, reps: int = 5) -> float:
    """Seconds per call when ``count`` calls ``fn(i)`` are replayed as one CUDA graph (median of
    ``reps`` replays, after an eager warm-up on a side stream, as torch recommends before
    capture, and one warm replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(count):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(count):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / count)
    return statistics.median(times)


def wall_time(fn, count: int, reps: int = 1) -> float:
    """Wall-clock seconds per call of ``count`` calls: the timers' stand-in for CPU dry runs."""
    t = time.perf_counter()
    for i in range(count):
        fn(i)
    return (time.perf_counter() - t) / count
