"""Equivalence tests: every rotation (and norm fusion, and dimension expansion) leaves the
full-precision model's logits unchanged (float32, max relative error < 1e-4)."""

from __future__ import annotations

import copy

import pytest
import torch

from hq_vllm.format import ActQuantSpec, HadaquantConfig, KVCacheSpec, RotationSpec, WeightQuantSpec
from hq_vllm.offline.rotation import (
    RotationOptions,
    default_r4_blocks,
    expand_hidden_size,
    expand_intermediate_size,
    fuse_rmsnorms_into_linears,
    head_dim_of,
    resolve_r4_blocks,
    rotate_model,
)
from hq_vllm.offline.simulate import attach_simulation
from tests.tiny_models import TINY_ARCHS, tiny_model

TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def random_ids(vocab: int, batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def online_only_config(r4: dict | None, r3_size: int | None) -> HadaquantConfig:
    """16-bit everything, only the online halves of R3/R4: the simulator must then be exact."""
    return HadaquantConfig(
        weight=WeightQuantSpec(bits=16),
        activation=ActQuantSpec(bits=16),
        kv_cache=KVCacheSpec(bits=16),
        rotation=RotationSpec(r3=None if r3_size is None else {"kind": "hadamard", "size": r3_size}, r4=r4),
    )


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("tied", [False, True])
def test_fuse_norms_preserves_logits(arch, tied):
    model = tiny_model(arch, tied=tied)
    ids = random_ids(model.config.vocab_size)
    ref = logits(model, ids)
    fuse_rmsnorms_into_linears(model)
    assert float(model.model.norm.weight.sub(1).abs().max()) == 0
    assert rel_err(logits(model, ids), ref) < TOL


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("kind", ["hadamard", "random_hadamard", "walsh", "grouped_walsh", "random_orthogonal"])
def test_rotated_model_matches_original(arch, kind):
    model = tiny_model(arch, tied=arch == "llama")
    ids = random_ids(model.config.vocab_size)
    ref = logits(model, ids)
    opts = RotationOptions(r1_kind=kind, r2_kind=kind, group_size=16 if kind == "grouped_walsh" else None, seed=3)
    applied = rotate_model(model, opts)
    sim = attach_simulation(model, online_only_config(applied.r4, head_dim_of(model.config)))
    out = logits(model, ids)
    sim.detach()
    assert rel_err(out, ref) < TOL
    # Without the online R4 half the function changes: the test can fail.
    assert rel_err(logits(model, ids), ref) > 1e-2


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("blocks", [2, 4])
def test_block_diagonal_r4_matches_original(arch, blocks):
    """Shard-local R4: ``blocks`` diagonal Hadamard blocks (128 = 2 x 64 or 4 x 32) fused into
    down_proj and applied online by the simulator give the original logits; the
    fused matrix really is block-diagonal (an online R4 over the whole size does not undo it)."""
    model = tiny_model(arch, intermediate=128)
    ids = random_ids(model.config.vocab_size)
    ref = logits(model, ids)
    applied = rotate_model(model, RotationOptions(seed=5, r4_blocks=blocks))
    assert applied.r4 == {"kind": "hadamard", "size": 128, "factor_k": 1, "blocks": blocks}
    sim = attach_simulation(model, online_only_config(applied.r4, head_dim_of(model.config)))
    out = logits(model, ids)
    sim.detach()
    assert rel_err(out, ref) < TOL
    one_block = {k: v for k, v in applied.r4.items() if k != "blocks"}
    sim = attach_simulation(model, online_only_config(one_block, head_dim_of(model.config)))
    wrong = logits(model, ids)
    sim.detach()
    assert rel_err(wrong, ref) > 1e-2


def test_block_diagonal_r4_with_a_paley_block():
    """Non-power-of-two blocks: I = 192 = 2 blocks of 96 = H_12 ⊗ H_8 (factor_k describes one
    block)."""
    model = tiny_model("qwen2", intermediate=192)
    ids = random_ids(model.config.vocab_size)
    ref = logits(model, ids)
    applied = rotate_model(model, RotationOptions(r4_blocks=2))
    assert applied.r4 == {"kind": "hadamard", "size": 192, "factor_k": 12, "blocks": 2}
    sim = attach_simulation(model, online_only_config(applied.r4, head_dim_of(model.config)))
    assert rel_err(logits(model, ids), ref) < TOL
    sim.detach()


def test_r4_blocks_default_and_errors():
    # the default: as many blocks as TP degrees the heads allow (<= 8) while a block's
    # power-of-two part stays >= 64 (the online transform's kernel gets no slower)
    assert default_r4_blocks(1536, 9) == 1  # SmolLM2: 9 heads, TP 1 only
    assert default_r4_blocks(4864, 14) == 1  # Qwen2.5-0.5B: 2 x 76·32 would slow the transform
    assert default_r4_blocks(11008, 32) == 1  # LLaMA-2-7B: 172·64, likewise
    assert default_r4_blocks(14336, 32) == 8  # Llama-3-8B: 8 x 28·64
    assert default_r4_blocks(18944, 28) == 2  # Qwen2.5-7B: 2 x 148·64 (28 heads: no TP 8)
    assert default_r4_blocks(128, 4) == 2 and default_r4_blocks(96, 4) == 1
    assert resolve_r4_blocks(4864, 14, None) == 1 and resolve_r4_blocks(4864, 14, 2) == 2
    with pytest.raises(ValueError, match=r"r4_blocks = 3: .*4864.*1, 2, 4, 8, 16, 19"):
        resolve_r4_blocks(4864, 14, 3)
    with pytest.raises(ValueError, match="r4_blocks must be a positive integer"):
        resolve_r4_blocks(4864, 14, 0)
    model = tiny_model("llama", intermediate=96)
    with pytest.raises(ValueError, match="r4_blocks = 5"):
        rotate_model(model, RotationOptions(r4_blocks=5))


def test_rotation_changes_weights_and_is_seeded():
    a, b, c = (tiny_model("llama") for _ in range(3))
    rotate_model(a, RotationOptions(seed=1))
    rotate_model(b, RotationOptions(seed=1))
    rotate_model(c, RotationOptions(seed=2))
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.allclose(wa, wc)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hidden_expansion_preserves_logits(arch):
    model = tiny_model(arch, hidden=48, intermediate=80)  # 48 = 12·4 exists; expand to 64 anyway
    ids = random_ids(model.config.vocab_size)
    ref = logits(model, ids)
    fuse_rmsnorms_into_linears(model)
    expand_hidden_size(model, 64)
    expand_intermediate_size(model, 96)
    assert model.config.hidden_size == 64 and model.config.intermediate_size == 96
    assert rel_err(logits(model, ids), ref) < TOL


def test_expansion_then_rotation_preserves_logits():
    model = tiny_model("llama", hidden=40, intermediate=72)  # 40 = Paley; 72 → 80 (Paley 20 · 4)
    ids = random_ids(model.config.vocab_size)
    ref = logits(model, ids)
    applied = rotate_model(model, RotationOptions(expand_hidden_to=64, expand_intermediate_to=80, r2=False))  # head_dim 10: no H_10
    assert applied.r1["size"] == 64 and applied.r4["size"] == 80
    sim = attach_simulation(model, online_only_config(applied.r4, None))
    assert rel_err(logits(model, ids), ref) < TOL
    sim.detach()


def test_qwen3_hidden_expansion_is_refused():
    model = tiny_model("qwen3")
    fuse_rmsnorms_into_linears(model)
    with pytest.raises(ValueError, match="Qwen3"):
        expand_hidden_size(model, 128)


def test_r3_online_leaves_attention_unchanged():
    model = tiny_model("qwen2")
    ids = random_ids(model.config.vocab_size)
    ref = logits(model, ids)
    sim = attach_simulation(model, online_only_config(None, head_dim_of(model.config)))
    assert rel_err(logits(model, ids), ref) < TOL
    sim.detach()


def _real_model_equivalence(model_dir, expect_tied: bool, expect_bias: bool, r4_blocks: int | None = None):
    from hq_vllm.offline.model_io import load_model

    model, tok = load_model(model_dir, dtype=torch.float32)
    assert bool(model.config.tie_word_embeddings) == expect_tied
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == expect_bias
    ids = tok(["The tower is 324 metres tall, about the same height", "def fibonacci(n):\n    return"],
              return_tensors="pt", padding=True).input_ids
    ref = logits(model, ids)
    applied = rotate_model(model, RotationOptions(seed=0, r4_blocks=r4_blocks))
    if r4_blocks is not None:
        assert applied.r4.get("blocks", 1) == r4_blocks
    sim = attach_simulation(model, online_only_config(applied.r4, head_dim_of(model.config)))
    out = logits(model, ids)
    sim.detach()
    assert rel_err(out, ref) < TOL
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    return applied


def test_real_smollm2_rotation_equivalence(smollm2_dir):
    _real_model_equivalence(smollm2_dir, expect_tied=True, expect_bias=False)


def test_real_smollm2_block_diagonal_r4_equivalence(smollm2_dir):
    """I = 1536 as 2 blocks of 768 = H_12 ⊗ H_64: what a TP-2 rank rotates on its own."""
    applied = _real_model_equivalence(smollm2_dir, expect_tied=True, expect_bias=False, r4_blocks=2)
    assert applied.r4 == {"kind": "hadamard", "size": 1536, "factor_k": 12, "blocks": 2}


def test_real_qwen_rotation_equivalence(qwen_dir):
    _real_model_equivalence(qwen_dir, expect_tied=False, expect_bias=True)


def test_simulator_respects_left_padding():
    """Batched, left-padded inputs give the same logits as each prompt alone (the mask reaches
    the simulated attention)."""
    model = tiny_model("llama")
    sim = attach_simulation(model, online_only_config(None, head_dim_of(model.config)))
    short, long = random_ids(256, 1, 8, seed=1), random_ids(256, 1, 12, seed=2)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        padded = model(input_ids=batch, attention_mask=mask).logits
        alone = model(input_ids=short).logits
    sim.detach()
    assert rel_err(padded[0, 4:], alone[0]) < TOL
