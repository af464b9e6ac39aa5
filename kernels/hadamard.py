"""Hadamard matrices and the rotation matrices built from them: all of hadaquant's rotation math.

Every rotation in the pipeline (R1..R4, DESIGN.md "The pipeline") is either a Hadamard matrix
H_n (entries ±1, H·Hᵀ = n·I) scaled by 1/sqrt(n), or derived from one. Keeping the constructions
in one file means the offline tool, the online transform (``fwht.py``) and the tests agree on the
exact matrix, entry for entry.

Sizes. A Hadamard matrix of order n > 2 exists only when 4 divides n, and we can only use the
orders we know how to build. Every size is factored as

    H_n = H_k ⊗ H_{2^e}        (Kronecker product, H_k the outer / slow index)

with H_{2^e} Sylvester's matrix and H_k one of:

* Paley I:  q ≡ 3 (mod 4) a prime power gives order q + 1;
* Paley II: q ≡ 1 (mod 4) a prime power gives order 2(q + 1);
* Williamson / Goethals–Seidel arrays: order 4m from four circulant ±1 matrices of order m,
  for the m hard-coded below (the orders Paley misses that real models need, e.g. 172 for
  LLaMA-2-7B's 11008 = 172·64);
* a Kronecker product of two of the above (rarely the smallest choice, but it costs nothing).

(Sylvester doubling H ⊗ H_2 needs no entry of its own: it is the power-of-two factor.)

``hadamard_factor`` picks the *smallest* k: the online transform pays a dense k×k product per
token, while the power-of-two part is a fast butterfly, so a large k is a speed bug. Sizes no
construction reaches raise ``UnsupportedHadamardSize`` (never a silent fallback); the caller can
zero-pad the dimension to ``expanded_size(n)`` instead (dimension expansion, as in the GBS paper).

Every H_k built here is checked (entries ±1 and H·Hᵀ = k·I exactly: float64 holds these integer
sums exactly) when it is first constructed, so a typo in the hard-coded sequences or a bug in the field arithmetic cannot slip
through as a non-orthogonal "rotation".
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "ROTATION_KINDS",
    "HadamardFactor",
    "UnsupportedHadamardSize",
    "expanded_size",
    "hadamard_factor",
    "hadamard_matrix",
    "is_supported",
    "rotation_matrix",
    "sequency_walsh_matrix",
    "small_hadamard",
    "supported_sizes",
]

ROTATION_KINDS = ("hadamard", "random_hadamard", "walsh", "grouped_walsh", "random_orthogonal")

#: Default block size of ``grouped_walsh`` is the largest power of two dividing n, capped here:
#: GSR aligns the Walsh blocks with the quantization groups, and 128 is the usual group size.
DEFAULT_MAX_WALSH_GROUP = 128

# ---------------------------------------------------------------------------------------------
# Hard-coded data: first rows of four circulant ±1 matrices (A, B, C, D) of order m with
#     A·Aᵀ + B·Bᵀ + C·Cᵀ + D·Dᵀ = 4m·I,
# i.e. sequences whose periodic autocorrelations sum to zero at every nonzero shift.
#
# How they were obtained: not copied from anywhere. They were found for this project by a
# stochastic local search (simulated annealing over the ±1 entries, minimising
# sum_{s=1..(m-1)/2} (PAF_A(s) + PAF_B(s) + PAF_C(s) + PAF_D(s))^2, restarted until it hit 0;
# ~1 CPU-minute for m = 43). For the Williamson array the search ran over *symmetric* sequences
# with a_0 = b_0 = c_0 = d_0 = 1 and d_j = -a_j·b_j·c_j (Williamson's normalisation); that space
# is small enough only for m = 23 within minutes, so the other orders use the Goethals–Seidel
# array, which accepts any circulants. Any quadruple with the property works; the check in
# ``_verified`` re-proves it on every construction. "+" is +1, "-" is -1.
# ---------------------------------------------------------------------------------------------

#: Symmetric circulants for the Williamson array (order 4m).
_WILLIAMSON_FIRST_ROWS: dict[int, tuple[str, str, str, str]] = {
    23: (
        "++---+-+-++++++-+-+---+",
        "+-++-+++--+--+--+++-++-",
        "+++--+---+----+---+--++",
        "+++-+--++++--++++--+-++",
    ),
}

#: General circulants for the Goethals–Seidel array (order 4m).
_GOETHALS_SEIDEL_FIRST_ROWS: dict[int, tuple[str, str, str, str]] = {
    29: (
        "++-++--+-+-+-----------+-+-+-",
        "++-+++----+-+-++----++--+----",
        "+----++---+-+++--++---+--+-++",
        "-----+-++--+-++---++-++-++++-",
    ),
    39: (
        "--+-+++-+--++--+-+----++++++++-++++--+-",
        "++----++-++--++++--+-++-+-+++++-+----+-",
        "----++--+-+-+++-+-++-+++--++--++++---+-",
        "+-++++++--+-++++-+++--+-+-+-++++--+--++",
    ),
    43: (
        "----++-+-+++-++++--++++-++------++++-+++-+-",
        "--+-+-+--++--+--++--+------+---++---++-++--",
        "++++-+--+++++--+-+-++-+---++---+-+---------",
        "++---+++-+-+-+++-+-++----+-++---+--+-++-++-",
    ),
}


class UnsupportedHadamardSize(ValueError):
    """No Hadamard matrix of this order can be built here.

    Raised at the earliest point (factoring the size), with the nearest supported sizes so the
    caller can pick one or zero-pad the dimension to ``expanded_size(n)``.
    """

    def __init__(self, n: int, reason: str, below: int | None, above: int) -> None:
        self.n, self.reason, self.below, self.above = n, reason, below, above
        below_text = str(below) if below is not None else "none"
        super().__init__(
            f"no Hadamard matrix of order {n} can be built: {reason}. Nearest supported sizes: "
            f"{below_text} below, {above} above. To keep this dimension, zero-pad it to "
            f"expanded_size({n}) = {above} (dimension expansion)."
        )


@dataclass(frozen=True)
class HadamardFactor:
    """H_n = H_k ⊗ H_pow2: ``k`` the dense factor (outer index), ``pow2`` the Sylvester part.

    ``construction`` names how H_k is built: "sylvester" (k = 1), "paley1(q=27)",
    "paley2(q=37)", "williamson(m=23)", "goethals_seidel(m=43)" or "kron(<a>,<b>)".
    """

    n: int
    k: int
    pow2: int
    construction: str


# ---------------------------------------------------------------------------------------------
# Number theory and finite fields (for the quadratic character of Paley's constructions)
# ---------------------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, m) with q = p**m and p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    m = 0
    while q % p == 0:
        q //= p
        m += 1
    return (p, m) if q == 1 else None


def _poly_remainder(a: list[int], b: list[int], p: int) -> list[int]:
    """a mod b over GF(p); polynomials as coefficient lists, lowest degree first, b monic."""
    a = list(a)
    while len(a) >= len(b):
        coef, shift = a[-1], len(a) - len(b)
        if coef:
            for i, bc in enumerate(b):
                a[shift + i] = (a[shift + i] - coef * bc) % p
        a.pop()
    return a


def _monic_polynomials(p: int, degree: int):
    for code in range(p**degree):
        yield [(code // p**i) % p for i in range(degree)] + [1]


def _irreducible_polynomial(p: int, m: int) -> list[int]:
    """The first monic irreducible polynomial of degree m over GF(p) (trial division)."""
    for f in _monic_polynomials(p, m):
        if f[0] == 0:
            continue
        if all(
            any(_poly_remainder(f, g, p)) for d in range(1, m // 2 + 1) for g in _monic_polynomials(p, d)
        ):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {m} over GF({p})")  # cannot happen


def _quadratic_character_matrix(q: int) -> torch.Tensor:
    """q×q int64 matrix chi(x_i - x_j) over GF(q), q an odd prime power.

    Field elements are encoded as integers 0..q-1 whose base-p digits are the coefficients of a
    polynomial modulo a fixed irreducible polynomial of degree m (for m = 1: plain integers mod p).
    chi is the quadratic character: 0 at 0, +1 on nonzero squares, -1 elsewhere.
    """
    p, m = _prime_power(q)
    modulus = _irreducible_polynomial(p, m) if m > 1 else [0, 1]

    def digits(x: int) -> list[int]:
        return [(x // p**i) % p for i in range(m)]

    def encode(coefficients: list[int]) -> int:
        return sum(c * p**i for i, c in enumerate(coefficients))

    def square(x: int) -> int:
        d = digits(x)
        product = [0] * (2 * m - 1)
        for i, di in enumerate(d):
            for j, dj in enumerate(d):
                product[i + j] = (product[i + j] + di * dj) % p
        r = _poly_remainder(product, modulus, p) if m > 1 else [product[0] % p]
        return encode(r + [0] * (m - len(r)))

    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[0] = 0
    chi[sorted({square(x) for x in range(1, q)})] = 1
    # Subtraction is digit-wise mod p, vectorised over all pairs.
    x = torch.arange(q)
    difference = torch.zeros(q, q, dtype=torch.int64)
    for i in range(m):
        place = p**i
        di = (x // place) % p
        difference += ((di[:, None] - di[None, :]) % p) * place
    return chi[difference]


# ---------------------------------------------------------------------------------------------
# Constructions
# ---------------------------------------------------------------------------------------------


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _sylvester(size: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Sylvester's H_size (size a power of two), H_2m = [[H_m, H_m], [H_m, -H_m]].

    Entry (i, j) is (-1)^popcount(i & j), the form the Triton kernel generates in registers.
    """
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley1(q: int) -> torch.Tensor:
    """Paley I, order q + 1 (q ≡ 3 mod 4): H = I + S, S = [[0, 1ᵀ], [-1, Q]], Q antisymmetric."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _quadratic_character_matrix(q)
    return s + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    """Paley II, order 2(q + 1) (q ≡ 1 mod 4), from the symmetric conference matrix
    S = [[0, 1ᵀ], [1, Q]]: H = S ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = 1
    s[1:, 1:] = _quadratic_character_matrix(q)
    plus = torch.tensor([[1, 1], [1, -1]])
    minus = torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(s, plus) + torch.kron(torch.eye(q + 1, dtype=torch.int64), minus)


def _circulants(first_rows: tuple[str, ...]) -> list[torch.Tensor]:
    out = []
    for row in first_rows:
        values = torch.tensor([1 if c == "+" else -1 for c in row], dtype=torch.int64)
        m = values.numel()
        index = (torch.arange(m)[None, :] - torch.arange(m)[:, None]) % m  # row i = row 0 shifted by i
        out.append(values[index])
    return out


def _williamson(m: int) -> torch.Tensor:
    """Williamson array of order 4m from symmetric circulants A, B, C, D."""
    a, b, c, d = _circulants(_WILLIAMSON_FIRST_ROWS[m])
    return torch.cat(
        [
            torch.cat([a, b, c, d], 1),
            torch.cat([-b, a, -d, c], 1),
            torch.cat([-c, d, a, -b], 1),
            torch.cat([-d, -c, b, a], 1),
        ],
        0,
    )


def _goethals_seidel(m: int) -> torch.Tensor:
    """Goethals–Seidel array of order 4m from circulants A, B, C, D (R = back-diagonal identity)."""
    a, b, c, d = _circulants(_GOETHALS_SEIDEL_FIRST_ROWS[m])
    r = torch.eye(m, dtype=torch.int64).flip(1)
    return torch.cat(
        [
            torch.cat([a, b @ r, c @ r, d @ r], 1),
            torch.cat([-b @ r, a, d.T @ r, -c.T @ r], 1),
            torch.cat([-c @ r, -d.T @ r, a, b.T @ r], 1),
            torch.cat([-d @ r, c.T @ r, -b.T @ r, a], 1),
        ],
        0,
    )


@functools.lru_cache(maxsize=None)
def _recipe(k: int) -> tuple | None:
    """How to build H_k directly (k a multiple of 4, not a power of two), or None.

    Returns ("paley1", q), ("paley2", q), ("williamson", m), ("goethals_seidel", m) or
    ("kron", k1, k2). Checked in that order: the Paley matrices need no data; the arrays need
    the hard-coded sequences; the Kronecker product is a last resort.
    """
    if k % 4 or _is_power_of_two(k):
        return None
    q = k - 1
    if q % 4 == 3 and _prime_power(q):
        return ("paley1", q)
    q = k // 2 - 1
    if q % 4 == 1 and _prime_power(q):
        return ("paley2", q)
    if k // 4 in _WILLIAMSON_FIRST_ROWS:
        return ("williamson", k // 4)
    if k // 4 in _GOETHALS_SEIDEL_FIRST_ROWS:
        return ("goethals_seidel", k // 4)
    for k1 in range(12, math.isqrt(k) + 1, 4):
        k2, rest = divmod(k, k1)
        if rest == 0 and _recipe(k1) is not None and _recipe(k2) is not None:
            return ("kron", k1, k2)
    return None


def _recipe_label(recipe: tuple) -> str:
    name = recipe[0]
    if name in ("paley1", "paley2"):
        return f"{name}(q={recipe[1]})"
    if name in ("williamson", "goethals_seidel"):
        return f"{name}(m={recipe[1]})"
    return f"kron({_recipe_label(_recipe(recipe[1]))},{_recipe_label(_recipe(recipe[2]))})"


def _build(k: int) -> torch.Tensor:
    """H_k (int64) for k = 1 or a k with a recipe."""
    if k == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    recipe = _recipe(k)
    name = recipe[0]
    if name == "paley1":
        return _paley1(recipe[1])
    if name == "paley2":
        return _paley2(recipe[1])
    if name == "williamson":
        return _williamson(recipe[1])
    if name == "goethals_seidel":
        return _goethals_seidel(recipe[1])
    return torch.kron(_build(recipe[1]), _build(recipe[2]))


def _verified(h: torch.Tensor, label: str) -> torch.Tensor:
    """Raise unless h has entries ±1 and h·hᵀ = k·I exactly (integer arithmetic)."""
    k = h.shape[0]
    exact = h.to(torch.float64)  # integer sums below 2^53 are exact, and BLAS is fast
    gram = exact @ exact.T
    if h.shape != (k, k) or not bool((h.abs() == 1).all()) or not torch.equal(
        gram, k * torch.eye(k, dtype=torch.float64)
    ):
        raise RuntimeError(f"construction {label} of order {k} is not a Hadamard matrix (bug or bad data)")
    return h


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


def _odd_part(n: int) -> tuple[int, int]:
    e = (n & -n).bit_length() - 1
    return n >> e, e


@functools.lru_cache(maxsize=4096)
def _factor_or_reason(n: int) -> HadamardFactor | str:
    if n == 1 or n == 2:
        return HadamardFactor(n, 1, n, "sylvester")
    odd, e = _odd_part(n)
    if odd == 1:
        return HadamardFactor(n, 1, n, "sylvester")
    if e < 2:
        return f"Hadamard orders other than 1 and 2 are multiples of 4 (n = {odd}·2^{e})"
    for a in range(2, e + 1):
        k = odd << a
        recipe = _recipe(k)
        if recipe is not None:
            return HadamardFactor(n, k, n // k, _recipe_label(recipe))
    orders = ", ".join(str(odd << a) for a in range(2, e + 1))
    return (
        f"n = {odd}·2^{e} needs a Hadamard matrix of order {orders} and none is constructible here "
        f"(Paley I/II, Williamson/Goethals-Seidel data, Kronecker products)"
    )


def is_supported(n: int) -> bool:
    """Whether ``hadamard_matrix(n)`` can be built."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return False
    return isinstance(_factor_or_reason(n), HadamardFactor)


def _check_size(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"a Hadamard size must be a positive int, got {n!r}")


def hadamard_factor(n: int) -> HadamardFactor:
    """Factor H_n = H_k ⊗ H_pow2 with the smallest k (k = 1 for powers of two).

    k must be odd_part(n)·2^a with a ≥ 2 (Hadamard orders are multiples of 4); the smallest a
    with a construction wins. Raises ``UnsupportedHadamardSize`` when no a works.
    """
    _check_size(n)
    result = _factor_or_reason(n)
    if isinstance(result, str):
        below = next((m for m in range(n - 1, 0, -1) if is_supported(m)), None)
        raise UnsupportedHadamardSize(n, result, below, expanded_size(n))
    return result


def expanded_size(n: int, *, max_k: int | None = None) -> int:
    """Smallest supported n' ≥ n: the size to zero-pad a dimension to (dimension expansion).

    With ``max_k``, only sizes whose dense factor k is at most ``max_k`` count, so the online
    transform stays cheap (a power of two always qualifies, so this terminates).
    """
    _check_size(n)
    m = n
    while True:
        f = _factor_or_reason(m)
        if isinstance(f, HadamardFactor) and (max_k is None or f.k <= max_k):
            return m
        m += 1


def supported_sizes(lo: int, hi: int, *, max_k: int | None = None) -> list[int]:
    """All supported sizes in [lo, hi] (optionally with dense factor k ≤ max_k)."""
    out = []
    for m in range(max(lo, 1), hi + 1):
        f = _factor_or_reason(m)
        if isinstance(f, HadamardFactor) and (max_k is None or f.k <= max_k):
            out.append(m)
    return out


# ---------------------------------------------------------------------------------------------
# Matrices
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _small_hadamard_int(k: int) -> torch.Tensor:
    f = hadamard_factor(k)
    h = torch.kron(_build(f.k), _sylvester(f.pow2)) if f.pow2 > 1 else _build(f.k)
    return _verified(h, f.construction)


def small_hadamard(k: int) -> torch.Tensor:
    """The k×k ±1 matrix H_k (float32), e.g. ``small_hadamard(hadamard_factor(n).k)``.

    Built once per k (and checked: H·Hᵀ = k·I); each call returns a fresh copy, so callers may
    modify it. Any supported k works, but it is meant for the small dense factor.
    """
    return _small_hadamard_int(k).to(torch.float32)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The n×n ±1 Hadamard matrix kron(small_hadamard(k), Sylvester(pow2)); H·Hᵀ = n·I.

    Not cached: it is n² entries (3.5 GB in float32 at n = 29568) and only the offline tool
    needs it whole; the online transform uses the factors (``fwht.py``).
    """
    f = hadamard_factor(n)
    hk = _small_hadamard_int(f.k).to(dtype, copy=True)  # never hand out the cached tensor
    return torch.kron(hk, _sylvester(f.pow2, dtype)) if f.pow2 > 1 else hk


def sequency_walsh_matrix(size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sylvester's H_size (size a power of two) with rows sorted by sequency (sign changes).

    Row i then oscillates i times, like a DCT basis: GSR's "sequency-ordered Walsh" rotation,
    which keeps neighbouring (similar-frequency) rows in one quantization group.
    """
    if not _is_power_of_two(size):
        raise ValueError(f"sequency-ordered Walsh needs a power-of-two size, got {size}")
    h = _sylvester(size)
    sign_changes = (h[:, 1:] != h[:, :-1]).sum(1)
    return h[torch.argsort(sign_changes, stable=True)].to(dtype)


def _walsh(n: int) -> torch.Tensor:
    """kron(H_k, sequency-Walsh(pow2)) / sqrt(n), float64."""
    f = hadamard_factor(n)
    w = sequency_walsh_matrix(f.pow2, torch.float64)
    if f.k > 1:
        w = torch.kron(_small_hadamard_int(f.k).to(torch.float64), w)
    return w / math.sqrt(n)


def rotation_matrix(
    kind: str,
    n: int,
    *,
    seed: int | None = 0,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """An orthonormal n×n rotation Q (Q·Qᵀ = I) of one of ``ROTATION_KINDS``.

    * ``hadamard``: H_n / sqrt(n).
    * ``random_hadamard``: diag(s)·H_n / sqrt(n), s random ±1 (QuaRot).
    * ``walsh``: kron(H_k, sequency-ordered Walsh(pow2)) / sqrt(n) (GSR; plain sequency Walsh
      for powers of two).
    * ``grouped_walsh``: block-diagonal, blocks = ``walsh`` of ``group_size`` (GSR). The default
      group is the largest power of two dividing n, capped at ``DEFAULT_MAX_WALSH_GROUP`` (128),
      to line up with the usual quantization groups. ``group_size`` must divide n and be a
      supported size; other kinds ignore it.
    * ``random_orthogonal``: Q from the QR of a Gaussian matrix, columns sign-fixed so Q is
      uniquely determined by the seed (the baseline of the rotation papers).

    Random kinds draw from a local ``torch.Generator`` seeded with ``seed`` (the global RNG is
    untouched), so the offline tool can rebuild the same rotation from the seed in the config.
    Computed in float64, returned in ``dtype``.
    """
    if kind not in ROTATION_KINDS:
        raise ValueError(f"unknown rotation kind {kind!r}; choose one of {', '.join(ROTATION_KINDS)}")
    _check_size(n)
    if kind in ("random_hadamard", "random_orthogonal"):
        if seed is None:
            raise ValueError(f"rotation kind {kind!r} needs an integer seed")
        generator = torch.Generator().manual_seed(int(seed))
    if kind == "hadamard":
        q = hadamard_matrix(n, torch.float64) / math.sqrt(n)
    elif kind == "random_hadamard":
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1
        q = signs.to(torch.float64)[:, None] * hadamard_matrix(n, torch.float64) / math.sqrt(n)
    elif kind == "walsh":
        q = _walsh(n)
    elif kind == "grouped_walsh":
        if group_size is None:
            group_size = min(n & -n, DEFAULT_MAX_WALSH_GROUP)
        if not isinstance(group_size, int) or group_size < 1 or n % group_size:
            raise ValueError(f"grouped_walsh: group_size {group_size!r} must be a positive divisor of {n}")
        q = torch.kron(torch.eye(n // group_size, dtype=torch.float64), _walsh(group_size))
    else:
        gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)[None, :]
    return q.to(dtype)
