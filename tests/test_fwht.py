"""Fast Walsh–Hadamard transform (kernels/fwht.py): Triton kernel vs torch reference vs dense.

How the Triton kernel runs on a CPU machine: ``hadamard_transform`` reads TRITON_INTERPRET at
*call* time and builds the interpreted or the compiled kernel accordingly, and the kernel uses
only Triton core builtins, so it interprets correctly whatever imported ``triton`` first (the
standard-library @jit helpers such as ``tl.zeros`` are bound at ``import triton``). The tests
therefore set the variable per test with ``monkeypatch`` (nothing leaks into other test files)
and, to be sure the kernel and not the CPU fallback is what gets compared, make the fallback
raise while the kernel runs. One test re-checks the import-order independence in a fresh
interpreter process.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from hq_vllm.kernels import fwht
from hq_vllm.kernels.fwht import hadamard_transform, hadamard_transform_reference
from hq_vllm.kernels.hadamard import UnsupportedHadamardSize, hadamard_matrix

# head dims (64, 128: whole vectors per program), SmolLM2 (576, 1536), Qwen2.5 (896, 3584,
# 4864 = 76·64), LLaMA (4096, 11008 = 172·64, 14336 = 28·512), a Paley I factor with pow2 = 1
# (12), one with pow2 = 2 (40), a small power of two with a left factor (256) and the largest
# factor (29568 = 924·32).
SIZES = [12, 40, 64, 128, 256, 576, 896, 1536, 3584, 4096, 4864, 11008, 14336, 29568]


@pytest.fixture
def interpreter(monkeypatch):
    """Run the Triton kernel under the interpreter; fail if the torch fallback is taken."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def no_fallback(*args, **kwargs):
        raise AssertionError("hadamard_transform fell back to the reference")

    monkeypatch.setattr(fwht, "hadamard_transform_reference", no_fallback)


def _dense(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """x @ H_n * scale in float64; above 12288 (H_n would take > 1 GB) the float64 reference,
    which is itself checked against the dense product at the smaller sizes."""
    n = x.shape[-1]
    scale = 1 / math.sqrt(n) if scale is None else scale
    if n > 12288:
        return hadamard_transform_reference(x.double(), scale)
    return (x.double() @ hadamard_matrix(n, torch.float64)) * scale


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("n", SIZES)
def test_reference_matches_dense(n):
    x = _randn(3, n, seed=n)
    y = hadamard_transform_reference(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert _rel(y, _dense(x)) < 1e-6
    x64 = x.double()
    assert _rel(hadamard_transform_reference(x64), _dense(x64)) < 1e-13


@pytest.mark.parametrize("n", SIZES)
def test_kernel_matches_reference_and_dense(n, interpreter):
    x = _randn(3, n, seed=n + 1)
    y = hadamard_transform(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert _rel(y, _dense(x)) < 1e-5
    assert _rel(y, hadamard_transform_reference(x)) < 1e-5


@pytest.mark.parametrize("n", [576, 4864])
def test_kernel_leading_dims_and_strides(n, interpreter):
    x = _randn(2, 3, n, seed=7)
    y = hadamard_transform(x)
    assert y.shape == (2, 3, n)
    assert _rel(y, _dense(x)) < 1e-5
    strided = _randn(n, 4, seed=8).T  # last-dim stride 4: the wrapper makes it contiguous
    assert _rel(hadamard_transform(strided), _dense(strided)) < 1e-5
    rows = _randn(5, 2 * n, seed=9)[:, :n]  # row stride 2n, last-dim stride 1: used as is
    assert _rel(hadamard_transform(rows), _dense(rows)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [64, 896, 4864, 11008])
def test_kernel_half_precision(n, dtype, interpreter):
    x = _randn(4, n, seed=n + 2, dtype=dtype)
    y = hadamard_transform(x)
    assert y.dtype == dtype
    exact = _dense(x)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3  # output rounding: 2^-9 / 2^-12
    assert _rel(y, exact) < tolerance
    reference = hadamard_transform_reference(x)  # this module's binding: the real reference
    assert reference.dtype == dtype and _rel(reference, exact) < tolerance
    # The kernel and the reference round (nearly) the same float32 values to the same format.
    assert torch.isclose(y.float(), reference.float(), rtol=1e-2, atol=0).float().mean() > 0.99


def test_kernel_single_pass_intermediate(interpreter, monkeypatch):
    monkeypatch.setattr(fwht, "_SPLIT_16BIT_INTERMEDIATE", False)
    x = _randn(4, 4864, seed=11, dtype=torch.bfloat16)
    assert _rel(hadamard_transform(x), _dense(x)) < 1e-2


def test_kernel_many_vectors_per_program(interpreter):
    x = _randn(130, 128, seed=12)  # 64 vectors per program: two full blocks and a ragged tail
    assert _rel(hadamard_transform(x), _dense(x)) < 1e-5


@pytest.mark.parametrize("n", SIZES + [8960, 13824, 18944, 27648])
def test_plan_tiles_cover_the_vector(n):
    p = fwht._plan(n)
    assert p.k * p.a * p.b == n and p.ka == p.k * p.a
    assert min(p.block_m, p.block_k, p.b_pad) >= 16 and p.b_pad >= p.b
    assert p.ka_pad >= p.ka and p.ka_pad % p.block_m == 0 and p.ka_pad % p.block_k == 0


@pytest.mark.parametrize("n", [128, 4864])
def test_kernel_scale(n, interpreter):
    x = _randn(2, n, seed=3)
    assert _rel(hadamard_transform(x, scale=1.0), _dense(x, 1.0)) < 1e-5
    assert _rel(hadamard_transform(x, 0.5), _dense(x, 0.5)) < 1e-5


@pytest.mark.parametrize("n", [64, 4096])
def test_kernel_is_an_involution_for_sylvester(n, interpreter):
    x = _randn(3, n, seed=4)
    assert _rel(hadamard_transform(hadamard_transform(x)), x) < 1e-5


@pytest.mark.parametrize("n", [896, 4864, 11008])  # Paley I, Paley II, Goethals–Seidel factors
def test_inverse_is_the_transpose(n, interpreter):
    x = _randn(3, n, seed=5)
    y = hadamard_transform(x)
    back = (y.double() @ hadamard_matrix(n, torch.float64).T) / math.sqrt(n)
    assert _rel(back, x) < 1e-5


def test_unsupported_size(monkeypatch):
    x = torch.randn(2, 14)
    with pytest.raises(UnsupportedHadamardSize):
        hadamard_transform_reference(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(UnsupportedHadamardSize):
        hadamard_transform(x)


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    original = fwht.hadamard_transform_reference

    def spy(x, scale=None):
        calls.append(x.shape)
        return original(x, scale)

    monkeypatch.setattr(fwht, "hadamard_transform_reference", spy)
    x = _randn(2, 576)
    assert _rel(hadamard_transform(x), _dense(x)) < 1e-5
    assert calls == [x.shape]


def test_float64_and_empty_use_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = _randn(2, 576).double()
    assert hadamard_transform(x).dtype == torch.float64
    assert _rel(hadamard_transform(x), _dense(x)) < 1e-13
    assert hadamard_transform(torch.empty(0, 576)).shape == (0, 576)


def test_interpreter_independent_of_import_order():
    """Import triton and the kernel module first, set TRITON_INTERPRET afterwards: still runs."""
    code = (
        "import os, torch, triton\n"
        "from hq_vllm.kernels import fwht\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "fwht.hadamard_transform_reference = None  # the kernel must not fall back\n"
        "x = torch.randn(2, 896)\n"
        "from hq_vllm.kernels.hadamard import hadamard_matrix\n"
        "y = fwht.hadamard_transform(x)\n"
        "d = x.double() @ hadamard_matrix(896, torch.float64) / 896 ** 0.5\n"
        "assert ((y.double() - d).norm() / d.norm()).item() < 1e-5\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("n, block", [(1536, 768), (4864, 2432), (128, 32)])
def test_block_transform_is_block_diagonal(n, block, interpreter):
    """The shard-local R4: equal diagonal blocks, each the block size's Hadamard; a rank's
    slice of whole blocks transforms to its slice of the whole transform."""
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    h = hadamard_matrix(block, torch.float64) / math.sqrt(block)
    dense = x @ torch.block_diag(*[h] * (n // block))
    got = fwht.block_hadamard_transform(x.float(), block).double()
    assert float((got - dense).abs().max()) < 1e-5
    half = n // 2
    assert torch.allclose(fwht.block_hadamard_transform(x.float()[:, half:], block).double(), dense[:, half:],
                          atol=1e-5)
    assert torch.equal(fwht.block_hadamard_transform(x.float(), n), hadamard_transform(x.float()))
    assert torch.equal(fwht.block_hadamard_transform(x.float()), hadamard_transform(x.float()))
    with pytest.raises(ValueError, match="does not divide the last dimension"):
        fwht.block_hadamard_transform(x.float(), block + 4)
