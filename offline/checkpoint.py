"""Writing and reading hadaquant checkpoints (an HF model directory; format in ``hq_vllm.format``).

Why atomic: quantizing a 7B model takes an hour; a crash, a full disk or a Ctrl-C while writing
must never leave a directory that looks like a checkpoint but is half of one (vLLM would load it
and fail in odd ways, or worse, not fail). Everything is written to a temporary directory beside
``out_dir`` (same filesystem, so ``os.rename`` is atomic), flushed, and renamed into place last.

Why deterministic: the same inputs give byte-identical files, so checkpoints can be compared by
hash, cached, and diffed when a recipe changes. JSON is written with sorted keys, tensors in
sorted name order with fixed safetensors metadata (``{"format": "pt"}``, no timestamps), shards
are filled greedily in that order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hq_vllm.format import QUANT_METHOD, CheckpointFormatError, HadaquantConfig, validate_tensors

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "TOKENIZER_FILES",
    "read_checkpoint_config",
    "write_checkpoint",
]

#: Hugging Face's default shard size (``save_pretrained(max_shard_size="5GB")``).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

#: Files copied from ``tokenizer_dir`` when present: what transformers and vLLM read to build
#: the tokenizer, its chat template and the default sampling settings.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
#: Directory of extra named chat templates (newer transformers), copied whole when present.
_TOKENIZER_DIRS = ("additional_chat_templates",)
#: Without one of these there is no tokenizer, and ``vllm serve`` fails at start-up.
_TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")

_SAFETENSORS_METADATA = {"format": "pt"}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _shards(names: list[str], tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy split of ``names`` (in order) into shards of at most ``max_bytes`` each; a tensor
    larger than the limit gets a shard of its own (as in transformers)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = _tensor_bytes(tensors[name])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer_dir {str(tokenizer_dir)!r} is not a directory")
    if not any((tokenizer_dir / f).is_file() for f in _TOKENIZER_CORE):
        raise FileNotFoundError(
            f"tokenizer_dir {str(tokenizer_dir)!r} has none of {', '.join(_TOKENIZER_CORE)}; "
            f"the checkpoint would have no tokenizer"
        )
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
            _fsync_file(dest / name)
    for name in _TOKENIZER_DIRS:
        src = tokenizer_dir / name
        if src.is_dir():
            shutil.copytree(src, dest / name, copy_function=shutil.copyfile)


def _write_into(
    tmp: Path,
    tensors: dict[str, torch.Tensor],
    config_json: bytes,
    max_shard_bytes: int,
    tokenizer_dir: str | os.PathLike | None,
) -> None:
    names = sorted(tensors)
    shards = _shards(names, tensors, max_shard_bytes)
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        save_file({n: tensors[n] for n in shard}, str(tmp / file), metadata=_SAFETENSORS_METADATA)
        _fsync_file(tmp / file)
        weight_map.update({n: file for n in shard})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(_tensor_bytes(t) for t in tensors.values())},
            "weight_map": weight_map,
        }
        _write_bytes(tmp / "model.safetensors.index.json", _json_bytes(index))
    _write_bytes(tmp / "config.json", config_json)
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), tmp)
    _fsync_dir(tmp)


def write_checkpoint(
    out_dir: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    hf_config: Mapping[str, Any],
    quant_config: HadaquantConfig,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    linears: Mapping[str, tuple[int, int]] | None = None,
) -> Path:
    """Write a complete hadaquant checkpoint to ``out_dir`` atomically; return its path.

    ``state_dict`` holds the final tensors (packed linears from ``format.pack_linear`` plus the
    unquantized rest, HF names). ``hf_config`` is the model's ``config.json`` dict; its
    ``quantization_config`` is set to ``quant_config.to_dict()`` after checking that the config
    fits the model (:meth:`HadaquantConfig.check_model`). If ``linears`` (``{prefix: (n, k)}``)
    is given, the tensors are validated against the format before anything is written.

    An existing ``out_dir`` is refused unless ``overwrite``; then the new directory replaces it
    by renames (the old one is moved aside, the new one moved in, the old one deleted), so at
    every instant ``out_dir`` is either the old or the new checkpoint. On any failure the
    temporary directory is removed and ``out_dir`` is untouched.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{str(out)!r} exists and is not a directory")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} already exists; pass overwrite=True to replace it")
    if not isinstance(quant_config, HadaquantConfig):
        raise TypeError(f"quant_config must be a HadaquantConfig, got {type(quant_config).__name__}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    config = dict(hf_config)
    quant_config.check_model(config)
    config["quantization_config"] = quant_config.to_dict()
    try:
        config_json = _json_bytes(config)
    except (TypeError, ValueError) as e:
        raise TypeError(f"hf_config is not plain JSON (pass config.to_dict() values): {e}") from None

    tensors: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict must map str to Tensor; got {name!r}: {type(t).__name__}")
        if "." not in name:  # e.g. pack_linear(...) called without prefix=
            raise ValueError(f"tensor name {name!r} has no module prefix (HF names look like "
                             f"'model.layers.0.self_attn.q_proj.qweight')")
        tensors[name] = t.detach().to("cpu").contiguous()
    if linears is not None:
        validate_tensors(tensors, linears, quant_config)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_into(tmp, tensors, config_json, max_shard_bytes, tokenizer_dir)
        if out.exists():
            if not overwrite:  # appeared while we were writing
                raise FileExistsError(f"{str(out)!r} appeared while writing; not replacing it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old / out.name, out)  # put the previous checkpoint back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_checkpoint_config(path: str | os.PathLike) -> tuple[dict[str, Any], HadaquantConfig]:
    """``(config.json dict, HadaquantConfig)`` of a hadaquant checkpoint directory."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r} not found: not a model directory")
    with open(config_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, Mapping) else None
        raise CheckpointFormatError(
            f"{str(config_path)!r} is not a hadaquant checkpoint: quantization_config.quant_method "
            f"is {method!r}, expected {QUANT_METHOD!r}"
        )
    return hf_config, HadaquantConfig.from_dict(qc)


def describe_checkpoint(path: str | os.PathLike) -> str:
    """Human-readable summary of a checkpoint: recipe, bit widths, rotations, overrides, sizes."""
    from safetensors import safe_open

    hf_config, qc = read_checkpoint_config(path)
    shards = sorted(Path(path).glob("*.safetensors"))
    counts: dict[str, int] = {}
    n_bytes = 0
    for shard in shards:
        n_bytes += shard.stat().st_size
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                leaf = key.rsplit(".", 1)[-1]
                counts[leaf] = counts.get(leaf, 0) + 1

    def bits(spec) -> str:
        return "16 (none)" if spec.bits >= 16 else str(spec.bits)

    w, a, kv, rot = qc.weight, qc.activation, qc.kv_cache, qc.rotation
    group = "per-channel" if w.group_size == -1 else f"group {w.group_size}"
    lines = [
        f"{path}: {hf_config.get('architectures', ['?'])[0]}, {hf_config.get('num_hidden_layers')} layers, "
        f"hidden {hf_config.get('hidden_size')}, intermediate {hf_config.get('intermediate_size')}",
        f"  format        hadaquant v{qc.format_version}, recipe {qc.recipe or '-'}",
        f"  weights       {bits(w)}-bit {'sym' if w.symmetric else 'asym'} {group}{', MSE clip' if w.mse_clip else ''}",
        f"  activations   {bits(a)}-bit per token{'' if a.bits >= 16 else f', clip {a.clip_ratio}'}",
        f"  kv cache      {bits(kv)}-bit per token+head{'' if kv.bits >= 16 else f', clip {kv.clip_ratio}'}",
    ]
    for slot in ("r1", "r2", "r3", "r4"):
        r = getattr(rot, slot)
        lines.append(f"  {slot}            " + ("-" if r is None else ", ".join(f"{k}={v}" for k, v in r.items())))
    if rot.original_hidden_size or rot.original_intermediate_size:
        lines.append(f"  expanded      hidden {rot.original_hidden_size} → {rot.expanded_hidden_size}, "
                     f"intermediate {rot.original_intermediate_size} → {rot.expanded_intermediate_size}")
    for name, ov in qc.layers.items():
        lines.append(f"  override      {name}: " + ", ".join(f"{k}={v}" for k, v in ov.to_dict().items() if v is not None))
    lines.append(f"  tp sizes      {', '.join(map(str, qc.tp_sizes))}")
    lines.append(f"  tensors       {', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}")
    lines.append(f"  size          {n_bytes / 2**20:.1f} MiB in {len(shards)} file(s)")
    return "\n".join(lines)
