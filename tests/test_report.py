"""The calibration report (offline/report.py): table and PNG plot from a config's overrides."""

from __future__ import annotations

import struct

import pytest

from hq_vllm.format import ActQuantSpec, HadaquantConfig, KVCacheSpec, LayerOverride, WeightQuantSpec
from hq_vllm.offline.report import layer_settings, overrides_table, plot_calibration


def _config() -> HadaquantConfig:
    layers = {
        "model.layers.0.mlp.down_proj": LayerOverride(weight_bits=8, act_bits=8, act_clip_ratio=0.5),
        "model.layers.1.self_attn.q_proj": LayerOverride(act_clip_ratio=0.625),
        "model.layers.1.self_attn.k_proj": LayerOverride(act_clip_ratio=0.625),
        "model.layers.1.self_attn.v_proj": LayerOverride(act_clip_ratio=0.625),
        "model.layers.1.self_attn.attn": LayerOverride(k_clip_ratio=0.875, v_clip_ratio=0.75),
    }
    return HadaquantConfig(
        weight=WeightQuantSpec(bits=3, group_size=64),
        activation=ActQuantSpec(bits=3, clip_ratio=0.9),
        kv_cache=KVCacheSpec(bits=3, clip_ratio=0.95),
        layers=layers,
        recipe="w3a3kv3",
        calibration={"smoothrot": {"alphas": [0.5, 0.25, None]}},
    )


def test_layer_settings_read_overrides_and_fall_back_to_globals():
    rows = layer_settings(_config(), num_layers=3)
    assert rows[0]["down_proj_clip"] == 0.5 and rows[0]["down_proj_wbits"] == 8 and rows[0]["down_proj_abits"] == 8
    assert rows[0]["qkv_clip"] == pytest.approx(0.9) and rows[0]["k_clip"] == pytest.approx(0.95)
    assert rows[1]["qkv_clip"] == 0.625 and rows[1]["k_clip"] == 0.875 and rows[1]["v_clip"] == 0.75
    assert rows[2]["gate_up_wbits"] == 3 and rows[2]["kv_bits"] == 3


def test_overrides_table_lists_raised_bits_and_alphas():
    table = overrides_table(_config(), num_layers=3).splitlines()
    assert len(table) == 4
    assert "down_proj w8a8" in table[1] and "0.50" in table[1]
    assert "0.6250" in table[2] and "0.8750" in table[2] and "0.25" in table[2]
    assert table[3].rstrip().endswith("-")


def test_num_layers_inferred_or_required():
    assert len(layer_settings(_config())) == 2  # highest overridden layer is 1
    with pytest.raises(ValueError, match="num_layers"):
        layer_settings(HadaquantConfig())


def test_plot_writes_a_png_atomically(tmp_path):
    out = plot_calibration(_config(), tmp_path / "sub" / "calibration.png", num_layers=3)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 600 and height > 400
    assert [p.name for p in out.parent.iterdir()] == ["calibration.png"]  # no temporary left behind
