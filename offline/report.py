"""What a checkpoint's calibration decided, per layer: a text table and a PNG plot.

Both read only the :class:`~hq_vllm.format.HadaquantConfig` (what the checkpoint records and the
plugin applies), so they describe any checkpoint, whichever run or tool made it:

* the effective clip ratio of every activation quantizer (the q/k/v input, the o_proj input, the
  gate/up input, the down_proj input) and of the K and V cache, per decoder layer: the
  per-layer override where one was searched (GBS), else the global value;
* the effective weight and activation bits per projection where a mixed-precision override
  raised them, and the KV bits;
* SmoothRot's per-layer alpha when ``calibration["smoothrot"]`` records one.

``hadaquant quantize`` writes ``calibration.png`` (and prints the table) into the checkpoint;
``hadaquant inspect CKPT --plot FILE`` draws it for an existing checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hq_vllm.format import HadaquantConfig, attention_key

__all__ = ["PROJECTIONS", "layer_settings", "overrides_table", "plot_calibration"]

#: Quantizer name -> the linear whose effective spec stands for it (siblings share one input).
PROJECTIONS = {
    "qkv": "self_attn.q_proj",
    "o_proj": "self_attn.o_proj",
    "gate_up": "mlp.gate_proj",
    "down_proj": "mlp.down_proj",
}


def _num_layers(config: HadaquantConfig, num_layers: int | None) -> int:
    if num_layers is not None:
        return num_layers
    seen = [int(k.split(".")[2]) for k in config.layers if k.startswith("model.layers.")]
    if not seen:
        raise ValueError("the config has no per-layer entries; pass num_layers (the model's decoder layers)")
    return max(seen) + 1


def layer_settings(config: HadaquantConfig, num_layers: int | None = None) -> list[dict[str, float | int]]:
    """Per decoder layer: ``{<quantizer>_clip, <quantizer>_wbits, <quantizer>_abits, k_clip, v_clip}``."""
    rows = []
    for i in range(_num_layers(config, num_layers)):
        row: dict[str, float | int] = {}
        for name, linear in PROJECTIONS.items():
            prefix = f"model.layers.{i}.{linear}"
            act = config.effective_act_spec(prefix)
            row[f"{name}_clip"] = act.clip_ratio
            row[f"{name}_abits"] = act.bits
            row[f"{name}_wbits"] = config.effective_weight_spec(prefix).bits
        k, v = config.effective_kv_specs(attention_key(i))
        row["k_clip"], row["v_clip"], row["kv_bits"] = k.clip_ratio, v.clip_ratio, k.bits
        rows.append(row)
    return rows


def _smoothrot_alphas(config: HadaquantConfig) -> dict[int, float]:
    record = (config.calibration or {}).get("smoothrot") or {}
    alphas = record.get("alphas", record.get("alpha")) if isinstance(record, dict) else None
    if isinstance(alphas, dict):
        return {int(k): float(v) for k, v in alphas.items() if v is not None}
    if isinstance(alphas, list):
        return {i: float(a) for i, a in enumerate(alphas) if a is not None}
    return {}


def overrides_table(config: HadaquantConfig, num_layers: int | None = None) -> str:
    """One row per layer: clip ratios (activations then K/V), raised bits (``w/a``), SmoothRot alpha."""
    rows = layer_settings(config, num_layers)
    alphas = _smoothrot_alphas(config)
    w, a = config.weight.bits, config.activation.bits
    head = ["layer", *PROJECTIONS, "k_cache", "v_cache", "raised bits", "alpha"]
    lines = ["  " + " ".join(f"{h:>9}" for h in head[:-2]) + f"  {head[-2]:<28} {head[-1]:>5}"]
    for i, row in enumerate(rows):
        clips = [row[f"{n}_clip"] for n in PROJECTIONS] + [row["k_clip"], row["v_clip"]]
        raised = [f"{n} w{row[f'{n}_wbits']}a{row[f'{n}_abits']}" for n in PROJECTIONS
                  if row[f"{n}_wbits"] != w or row[f"{n}_abits"] != a]
        alpha = f"{alphas[i]:.2f}" if i in alphas else "-"
        lines.append(f"  {i:>9} " + " ".join(f"{c:>9.4f}" for c in clips)
                     + f"  {', '.join(raised) or '-':<28} {alpha:>5}")
    return "\n".join(lines)


def plot_calibration(config: HadaquantConfig, path: str | os.PathLike, *, num_layers: int | None = None,
                     title: str | None = None) -> Path:
    """Draw the per-layer clips (top), raised bits and SmoothRot alphas (bottom) into a PNG at
    ``path`` (written to a temporary file first, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = layer_settings(config, num_layers)
    layers = list(range(len(rows)))
    alphas = _smoothrot_alphas(config)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    for name in PROJECTIONS:
        top.plot(layers, [r[f"{name}_clip"] for r in rows], marker="o", ms=3, label=f"{name} input")
    if config.kv_cache.bits < 16:
        top.plot(layers, [r["k_clip"] for r in rows], marker="s", ms=3, ls="--", label="K cache")
        top.plot(layers, [r["v_clip"] for r in rows], marker="s", ms=3, ls="--", label="V cache")
    top.set_ylabel("clip ratio")
    top.set_ylim(0, 1.05)
    top.grid(alpha=0.3)
    top.legend(ncol=3, fontsize=8, loc="lower left")
    top.set_title(title or f"{config.recipe or 'hadaquant'}: per-layer calibration")

    w, a = config.weight.bits, config.activation.bits
    for k, name in enumerate(PROJECTIONS):
        xs = [i for i, r in enumerate(rows) if r[f"{name}_wbits"] != w or r[f"{name}_abits"] != a]
        bottom.scatter(xs, [k] * len(xs), marker="s", s=40, label=None)
        for i in xs:
            bottom.annotate(f"w{rows[i][f'{name}_wbits']}a{rows[i][f'{name}_abits']}", (i, k),
                            textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    bottom.set_yticks(range(len(PROJECTIONS)), [f"{n} (raised bits)" for n in PROJECTIONS], fontsize=8)
    bottom.set_ylim(-0.7, len(PROJECTIONS) - 0.3)
    bottom.set_xlabel("decoder layer")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(alpha=0.3)
    if alphas:
        twin = bottom.twinx()
        twin.plot(sorted(alphas), [alphas[i] for i in sorted(alphas)], color="k", lw=1, marker=".",
                  label="SmoothRot alpha")
        twin.set_ylim(-0.05, 1.05)
        twin.set_ylabel("SmoothRot alpha")
        twin.legend(fontsize=8, loc="upper right")
    fig.tight_layout()

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, metadata={"Software": None})  # no version stamp: same config, same bytes
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
