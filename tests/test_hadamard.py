"""Hadamard constructions, size factoring and rotation matrices (kernels/hadamard.py).

Orthogonality is checked exactly: ±1 matrices multiplied in float32/float64 give integer sums far
below 2^24, so H·Hᵀ = n·I is an equality test, not a tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from hq_vllm.kernels import hadamard as hd
from hq_vllm.kernels.hadamard import (
    ROTATION_KINDS,
    HadamardFactor,
    UnsupportedHadamardSize,
    expanded_size,
    hadamard_factor,
    hadamard_matrix,
    is_supported,
    rotation_matrix,
    sequency_walsh_matrix,
    small_hadamard,
    supported_sizes,
)

# Real model dimensions (hidden, intermediate, head_dim) and the small orders Paley reaches.
MODEL_SIZES = [64, 128, 576, 896, 1536, 3584, 4096, 4864, 8960, 11008, 13824, 14336, 18944, 27648, 29568]
SMALL_ORDERS = [12, 20, 28, 36, 40, 44, 52, 60, 68, 76, 84, 108, 124, 140, 148, 924]
ARRAY_ORDERS = [92, 116, 156, 172]  # beyond Paley: Williamson / Goethals–Seidel data
REQUIRED = MODEL_SIZES + SMALL_ORDERS + ARRAY_ORDERS

EXPECTED_K = {
    64: 1,
    128: 1,
    4096: 1,
    576: 36,
    896: 28,
    1536: 12,
    3584: 28,
    4864: 76,
    8960: 140,
    11008: 172,
    13824: 108,
    14336: 28,
    18944: 148,
    27648: 108,
    29568: 924,
    40: 20,
    92: 92,
    116: 116,
    156: 156,
    172: 172,
}

EXPECTED_CONSTRUCTION = {
    4096: "sylvester",
    1536: "paley1(q=11)",
    896: "paley1(q=27)",  # needs GF(27) = GF(3^3)
    52: "paley2(q=25)",  # needs GF(25) = GF(5^2)
    576: "paley2(q=17)",
    4864: "paley2(q=37)",
    18944: "paley2(q=73)",
    29568: "paley2(q=461)",
    92: "williamson(m=23)",
    11008: "goethals_seidel(m=43)",
}


def _assert_hadamard(h: torch.Tensor) -> None:
    n = h.shape[0]
    assert h.shape == (n, n)
    assert bool((h.abs() == 1).all())
    exact = h.to(torch.float32)  # integer sums of magnitude <= n < 2^24: exact in float32
    assert torch.equal(exact @ exact.T, n * torch.eye(n, dtype=torch.float32))


@pytest.mark.parametrize("n", REQUIRED)
def test_factor_shape_and_small_factor_is_hadamard(n):
    f = hadamard_factor(n)
    assert isinstance(f, HadamardFactor) and f.n == n and f.k * f.pow2 == n
    assert f.pow2 & (f.pow2 - 1) == 0
    assert f.k == 1 or f.k % 4 == 0
    h = small_hadamard(f.k)
    assert h.dtype == torch.float32
    _assert_hadamard(h)


@pytest.mark.parametrize("n", sorted(EXPECTED_K))
def test_factor_picks_smallest_k(n):
    assert hadamard_factor(n).k == EXPECTED_K[n]


@pytest.mark.parametrize("n", sorted(EXPECTED_CONSTRUCTION))
def test_construction_names(n):
    assert hadamard_factor(n).construction == EXPECTED_CONSTRUCTION[n]


@pytest.mark.parametrize("n", [n for n in REQUIRED if n <= 4864])
def test_full_matrix_is_hadamard(n):
    h = hadamard_matrix(n)
    assert h.dtype == torch.float32
    _assert_hadamard(h)


def test_full_matrix_is_kron_of_factors():
    f = hadamard_factor(4864)
    expected = torch.kron(small_hadamard(f.k), hadamard_matrix(f.pow2))
    assert torch.equal(hadamard_matrix(4864), expected)
    assert hadamard_matrix(4864, torch.float64).dtype == torch.float64


@pytest.mark.parametrize("n", [11008])  # the Goethals–Seidel factor times 64; 485 MB in float32
def test_large_matrix_sampled_rows_orthogonal(n):
    h = hadamard_matrix(n)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:16]
    gram = h[rows] @ h.T  # exact: integer sums below 2^24
    expected = torch.zeros(16, n)
    expected[torch.arange(16), rows] = n
    assert torch.equal(gram, expected)


def test_small_hadamard_returns_a_copy():
    h = small_hadamard(12)
    h.zero_()
    _assert_hadamard(small_hadamard(12))
    m = hadamard_matrix(12)
    m.zero_()
    _assert_hadamard(hadamard_matrix(12))


@pytest.mark.parametrize(
    "q", [9, 11, 13, 25, 27, 49, 81, 121, 125, 243]  # primes and prime powers p^2..p^5
)
def test_paley_over_prime_powers(q):
    h = hd._paley1(q) if q % 4 == 3 else hd._paley2(q)
    _assert_hadamard(h)


def test_array_data_is_well_formed():
    for m, rows in hd._WILLIAMSON_FIRST_ROWS.items():
        for row in rows:
            assert len(row) == m and row == row[0] + row[1:][::-1]  # symmetric circulant
    for table in (hd._WILLIAMSON_FIRST_ROWS, hd._GOETHALS_SEIDEL_FIRST_ROWS):
        for m, rows in table.items():
            seqs = [torch.tensor([1 if c == "+" else -1 for c in row]) for row in rows]
            for s in range(1, m):
                assert sum(int((x * x.roll(s)).sum()) for x in seqs) == 0


def test_corrupted_data_is_rejected(monkeypatch):
    rows = list(hd._GOETHALS_SEIDEL_FIRST_ROWS[43])
    rows[0] = ("-" if rows[0][0] == "+" else "+") + rows[0][1:]
    monkeypatch.setitem(hd._GOETHALS_SEIDEL_FIRST_ROWS, 43, tuple(rows))
    with pytest.raises(RuntimeError, match="not a Hadamard matrix"):
        hd._verified(hd._build(172), "goethals_seidel(m=43)")


@pytest.mark.parametrize("n", [3, 6, 14, 22, 1001, 7 * 2, 188, 65 * 4])
def test_unsupported_sizes_raise_with_neighbours(n):
    assert not is_supported(n)
    with pytest.raises(UnsupportedHadamardSize) as info:
        hadamard_factor(n)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.n == n and err.above == expanded_size(n) > n
    assert err.below is not None and err.below < n and is_supported(err.below)
    assert all(not is_supported(m) for m in range(err.below + 1, err.above))
    message = str(err)
    assert str(n) in message and str(err.below) in message and str(err.above) in message
    assert "expanded_size" in message
    with pytest.raises(UnsupportedHadamardSize):
        hadamard_matrix(n)


def test_unsupported_size_message_example():
    with pytest.raises(UnsupportedHadamardSize, match=r"order 14 .* 12 below, 16 above"):
        hadamard_factor(14)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True])
def test_bad_size_type(bad):
    with pytest.raises(ValueError):
        hadamard_factor(bad)


def test_expanded_size():
    assert expanded_size(4864) == 4864
    assert expanded_size(14) == 16
    assert expanded_size(1001) == 1008
    assert expanded_size(5) == 8
    n = expanded_size(11008, max_k=64)
    assert hadamard_factor(n).k <= 64
    assert supported_sizes(11008, n, max_k=64) == [n]


def test_supported_sizes():
    assert supported_sizes(1, 64) == [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64]
    assert all(is_supported(n) for n in REQUIRED)


def test_odd_times_eight():
    f = hadamard_factor(1000)  # 125·8: k = 500 from Paley I (q = 499)
    assert (f.k, f.pow2) == (500, 2)


# ---------------------------------------------------------------------------------------------
# Rotations
# ---------------------------------------------------------------------------------------------

ROTATION_SIZES = [64, 576, 896, 172]


@pytest.mark.parametrize("kind", ROTATION_KINDS)
@pytest.mark.parametrize("n", ROTATION_SIZES)
def test_rotation_is_orthonormal(kind, n):
    q = rotation_matrix(kind, n, seed=3)
    assert q.dtype == torch.float64 and q.shape == (n, n)
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(q @ q.T, eye, atol=1e-12)
    assert torch.allclose(q.T @ q, eye, atol=1e-12)


@pytest.mark.parametrize("kind", ["random_hadamard", "random_orthogonal"])
def test_random_rotations_seeded(kind):
    state = torch.get_rng_state()
    a = rotation_matrix(kind, 576, seed=1)
    b = rotation_matrix(kind, 576, seed=1)
    c = rotation_matrix(kind, 576, seed=2)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="seed"):
        rotation_matrix(kind, 64, seed=None)


@pytest.mark.parametrize("kind", ["hadamard", "walsh", "grouped_walsh"])
def test_deterministic_rotations_ignore_seed(kind):
    assert torch.equal(rotation_matrix(kind, 576, seed=1), rotation_matrix(kind, 576, seed=None))


def test_hadamard_rotation_values():
    n = 896
    q = rotation_matrix("hadamard", n)
    assert torch.equal(q, hadamard_matrix(n, torch.float64) / math.sqrt(n))
    r = rotation_matrix("random_hadamard", n, seed=0) * math.sqrt(n)
    signs = r / hadamard_matrix(n, torch.float64)
    assert bool((signs.abs() == 1).all())
    assert bool((signs == signs[:, :1]).all())  # diag(s)·H: one sign per row
    assert (signs[:, 0] > 0).any() and (signs[:, 0] < 0).any()


def test_dtype_argument():
    assert rotation_matrix("hadamard", 64, dtype=torch.float32).dtype == torch.float32


def test_sequency_walsh_order():
    w = sequency_walsh_matrix(64)
    changes = (w[:, 1:] != w[:, :-1]).sum(1)
    assert torch.equal(changes, torch.arange(64))
    q = rotation_matrix("walsh", 64) * 8
    assert torch.equal(q, w.to(torch.float64))
    # The rows are those of the Sylvester matrix, reordered.
    assert sorted(map(tuple, w.tolist())) == sorted(map(tuple, hadamard_matrix(64).tolist()))


def test_walsh_non_power_of_two():
    n = 576  # 36·16
    q = rotation_matrix("walsh", n) * math.sqrt(n)
    expected = torch.kron(small_hadamard(36).double(), sequency_walsh_matrix(16, torch.float64))
    assert torch.equal(q, expected)


@pytest.mark.parametrize("n, group_size, expected_group", [(576, None, 64), (4864, None, 128), (576, 32, 32), (896, 28, 28)])
def test_grouped_walsh_is_block_diagonal(n, group_size, expected_group):
    q = rotation_matrix("grouped_walsh", n, group_size=group_size)
    block = rotation_matrix("walsh", expected_group)
    assert torch.equal(q, torch.block_diag(*[block] * (n // expected_group)))


def test_grouped_walsh_bad_group():
    with pytest.raises(ValueError, match="divisor"):
        rotation_matrix("grouped_walsh", 576, group_size=100)
    with pytest.raises(UnsupportedHadamardSize):
        rotation_matrix("grouped_walsh", 576, group_size=18)


def test_group_size_ignored_by_other_kinds():
    assert torch.equal(rotation_matrix("hadamard", 64, group_size=16), rotation_matrix("hadamard", 64))


def test_unknown_kind():
    with pytest.raises(ValueError) as info:
        rotation_matrix("householder", 64)
    for kind in ROTATION_KINDS:
        assert kind in str(info.value)
