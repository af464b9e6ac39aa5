"""The ``hadaquant`` command line: fetch-model, quantize, inspect, eval.

MODEL arguments take an HF directory or the name of a shipped model (``smollm2``,
``qwen2.5-0.5b``), which is converted once from its PyPI package and cached under ``.cache/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2"


def _resolve_model(name_or_dir: str) -> Path:
    from hq_vllm.offline.model_io import SHIPPED_MODELS, cached_model_dir

    if name_or_dir in SHIPPED_MODELS and not Path(name_or_dir).exists():
        return cached_model_dir(name_or_dir)
    path = Path(name_or_dir)
    if not path.is_dir():
        raise SystemExit(
            f"error: {name_or_dir!r} is neither a model directory nor a shipped model "
            f"({', '.join(SHIPPED_MODELS)})"
        )
    return path


def _add_recipe_args(p: argparse.ArgumentParser, default_recipe: str | None) -> None:
    from hq_vllm.kernels.hadamard import ROTATION_KINDS
    from hq_vllm.offline.pipeline import RECIPES

    p.add_argument("--recipe", default=default_recipe, choices=sorted(RECIPES), help="bit widths (w/a/kv)")
    p.add_argument("--no-rotate", action="store_true", help="skip norm fusion and rotations (RTN baseline)")
    p.add_argument("--rotation", default="random_hadamard", choices=ROTATION_KINDS, help="R1/R2 kind")
    p.add_argument("--walsh-group", type=int, default=None, help="block size for grouped_walsh")
    p.add_argument("--r4-blocks", type=int, default=None,
                   help="diagonal blocks of the online R4 Hadamard (tensor parallel sizes dividing it can "
                        "serve the checkpoint; default: up to 8, as many as the attention heads allow TP "
                        "degrees while the online transform gets no slower, e.g. 1 for Qwen2.5-0.5B: pass 2 "
                        "to serve it at TP 2)")
    p.add_argument("--expand-hidden", type=int, default=None, help="zero-pad the hidden size to this (dimension expansion)")
    p.add_argument("--expand-intermediate", type=int, default=None, help="zero-pad the intermediate size to this")
    p.add_argument("--group-size", type=int, default=None, help="weight group size (-1: per channel)")
    p.add_argument("--asym-weights", action="store_true", help="asymmetric weight grid")
    p.add_argument("--no-mse-clip", action="store_true", help="plain absmax weight scales")
    p.add_argument("--act-clip", type=float, default=None, help="activation clip ratio (default 0.9)")
    p.add_argument("--kv-clip", type=float, default=None, help="KV-cache clip ratio (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="rotation and calibration-window seed")
    p.add_argument("--method", default="full", choices=["full", "quarot", "rtn"],
                   help="calibration: full = GPTQ + GBS clip search + SmoothRot + spike-aware mixed precision "
                        "(each where the recipe can use it; the default); quarot = GPTQ + fixed clips; rtn = "
                        "round-to-nearest, fixed clips, no calibration text (seconds). The flags below "
                        "override single components")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--gptq", dest="weight_method", action="store_const", const="gptq", default=None,
                         help="GPTQ weights (Hessians from calibration text)")
    weights.add_argument("--rtn", dest="weight_method", action="store_const", const="rtn",
                         help="round-to-nearest weights")
    p.add_argument("--calib-sequences", type=int, default=128, help="GPTQ calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per GPTQ calibration window")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean(diag H)")
    p.add_argument("--act-order", action="store_true", help="GPTQ columns by descending diag(H) (static groups)")
    p.add_argument("--calib-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="GPTQ calibration forward pass (Hessians are float32 either way)")
    p.add_argument("--clip-search", default=None, choices=["fixed", "gbs"],
                   help="activation/KV clip ratios: fixed (--act-clip/--kv-clip) or gradual binary search "
                        "per layer and projection on calibration text")
    p.add_argument("--gbs-start-bits", type=int, default=None,
                   help="GBS: bits of the quantizers not searched yet (default: the target bits; 16: unquantized)")
    p.add_argument("--gbs-direction", default="forward", choices=["forward", "backward"],
                   help="GBS: layers first→last (forward) or last→first (backward)")
    p.add_argument("--gbs-sequences", type=int, default=16, help="GBS calibration windows")
    p.add_argument("--gbs-seq-len", type=int, default=256, help="tokens per GBS calibration window")
    p.add_argument("--gbs-rounds", type=int, default=4, help="GBS bisection rounds after the 0.25 grid")
    p.add_argument("--gbs-target", default="layer", choices=["layer", "model"],
                   help="GBS loss: each layer's output vs the FP layer on the same input (layer) or vs "
                        "the FP model's output (model)")
    p.add_argument("--gbs-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="GBS forward pass (fake quantization and loss are float32 either way)")
    p.add_argument("--no-smoothrot", dest="smoothrot", action="store_false", default=None,
                   help="no SmoothRot (the full method's default is on when activations are quantized)")
    p.add_argument("--smoothrot", action="store_true", default=None,
                   help="SmoothRot: calibrated per-channel scales on the down_proj input before R4, folded "
                        "into up_proj/down_proj (alpha searched per layer)")
    p.add_argument("--smoothrot-alpha", type=float, default=None,
                   help="SmoothRot with this alpha in [0, 1] for every layer instead of the search (implies --smoothrot)")
    p.add_argument("--smoothrot-sequences", type=int, default=16, help="SmoothRot calibration windows")
    p.add_argument("--smoothrot-seq-len", type=int, default=256, help="tokens per SmoothRot calibration window")
    p.add_argument("--mp-budget", type=int, default=None,
                   help="spike-aware mixed precision: keep this many projection groups (qkv, o_proj, gate_up, down_proj of a layer), those whose inputs quantize worst on calibration text, at --mp-bits (0: off)")
    p.add_argument("--mp-bits", type=int, default=8, choices=[8, 16],
                   help="weight and activation bits of the kept projection groups (never lowers a width)")
    p.add_argument("--mp-sequences", type=int, default=16, help="mixed-precision calibration windows")
    p.add_argument("--mp-seq-len", type=int, default=256, help="tokens per mixed-precision calibration window")


def _options(args):
    from hq_vllm.offline.pipeline import method_options
    from hq_vllm.offline.rotation import RotationOptions

    base = method_options(args.method, args.recipe)
    smoothrot = base.smoothrot if args.smoothrot is None else args.smoothrot
    return method_options(
        args.method,
        recipe=args.recipe,
        rotate=not args.no_rotate,
        rotation=RotationOptions(
            r1_kind=args.rotation,
            r2_kind=args.rotation,
            group_size=args.walsh_group,
            r4_blocks=args.r4_blocks,
            expand_hidden_to=args.expand_hidden,
            expand_intermediate_to=args.expand_intermediate,
        ),
        group_size=args.group_size,
        weight_symmetric=False if args.asym_weights else None,
        mse_clip=False if args.no_mse_clip else None,
        act_clip=args.act_clip,
        kv_clip=args.kv_clip,
        seed=args.seed,
        weight_method=args.weight_method or base.weight_method,
        calib_sequences=args.calib_sequences,
        calib_seq_len=args.calib_seq_len,
        damp=args.damp,
        act_order=args.act_order,
        calib_dtype=args.calib_dtype,
        clip_search=args.clip_search or base.clip_search,
        gbs_start_bits=args.gbs_start_bits,
        gbs_direction=args.gbs_direction,
        gbs_sequences=args.gbs_sequences,
        gbs_seq_len=args.gbs_seq_len,
        gbs_rounds=args.gbs_rounds,
        gbs_target=args.gbs_target,
        gbs_dtype=args.gbs_dtype,
        smoothrot=smoothrot or args.smoothrot_alpha is not None,
        smoothrot_alpha=args.smoothrot_alpha,
        smoothrot_sequences=args.smoothrot_sequences,
        smoothrot_seq_len=args.smoothrot_seq_len,
        mp_budget=base.mp_budget if args.mp_budget is None else args.mp_budget,
        mp_bits=args.mp_bits,
        mp_sequences=args.mp_sequences,
        mp_seq_len=args.mp_seq_len,
    )


def cmd_fetch_model(args) -> int:
    from hq_vllm.offline.model_io import fetch_model

    start = time.perf_counter()
    out = fetch_model(args.name, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _components(options, sep: str) -> str:
    """What a run did, for labels and default output names: ``w3a3kv3-gptq-gbs-smoothrot-mp2x8``."""
    parts = [options.recipe]
    if not options.rotate:
        parts.append("norot")
    elif options.rotation.r1_kind != "random_hadamard":
        parts.append(options.rotation.r1_kind)
    parts.append(options.weight_method)
    if options.clip_search == "gbs":
        parts.append("gbs")
    if options.smoothrot:
        parts.append("smoothrot")
    if options.mp_budget:
        parts.append(f"mp{options.mp_budget}x{options.mp_bits}")
    return sep.join(parts)


def _report_calibration(ckpt, png, *, table: bool) -> None:
    """Draw a checkpoint's per-layer calibration plot at ``png`` (and print its per-layer table)."""
    from hq_vllm.offline.checkpoint import read_checkpoint_config
    from hq_vllm.offline.report import overrides_table, plot_calibration

    hf_config, qconfig = read_checkpoint_config(ckpt)
    n = hf_config["num_hidden_layers"]
    if table:
        print("  per layer     clip ratios (activations, K/V), raised bits, SmoothRot alpha")
        print(overrides_table(qconfig, n))
    print(f"  plot          {plot_calibration(qconfig, png, num_layers=n)}")


def cmd_quantize(args) -> int:
    from hq_vllm.offline.pipeline import quantize_to_checkpoint

    model_dir = _resolve_model(args.model)
    options = _options(args)
    out = args.out_dir or f"runs/{Path(args.model).name}-{_components(options, '-')}"
    summary = quantize_to_checkpoint(model_dir, out, options, overwrite=args.overwrite)
    print(summary.render())
    if any(r is not None for r in (summary.clip_search, summary.smoothrot, summary.mixed_precision)):
        # the summary above already lists the searched clips, SmoothRot alphas and raised groups
        _report_calibration(out, Path(out) / "calibration.png", table=False)  # same bytes for a seed
    if args.eval_sequences:
        import torch

        from hq_vllm.offline.evaluate import perplexity
        from hq_vllm.offline.model_io import load_model
        from hq_vllm.offline.pipeline import load_checkpoint_simulated

        n = args.eval_sequences
        fp_model, tok = load_model(model_dir, dtype=torch.bfloat16)
        fp = perplexity(fp_model, tok, seq_len=512, max_sequences=n)
        del fp_model
        q_model, _, _, _ = load_checkpoint_simulated(out, dtype=torch.bfloat16)
        q = perplexity(q_model, tok, seq_len=512, max_sequences=n)
        print(f"  perplexity    {q:,.2f} quantized (simulated) vs {fp:,.2f} full precision "
              f"(held-out BoolQ passages, {n}×512 tokens, bf16)")
    return 0


def cmd_inspect(args) -> int:
    from hq_vllm.offline.checkpoint import describe_checkpoint, read_checkpoint_config

    if args.json:
        hf_config, _ = read_checkpoint_config(args.checkpoint)
        print(json.dumps(hf_config["quantization_config"], indent=2, sort_keys=True))
        return 0
    print(describe_checkpoint(args.checkpoint))
    if args.plot:
        _report_calibration(args.checkpoint, args.plot, table=True)
    return 0


def cmd_eval(args) -> int:
    import torch

    from hq_vllm.offline.evaluate import TASKS, evaluate, results_to_markdown
    from hq_vllm.offline.model_io import load_model, read_hf_config
    from hq_vllm.offline.pipeline import load_checkpoint_simulated, simulated_model

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    model_dir = _resolve_model(args.model)
    is_checkpoint = "quantization_config" in read_hf_config(model_dir)
    if is_checkpoint:
        model, tokenizer, _, _ = load_checkpoint_simulated(model_dir, dtype=dtype)
        label = f"{Path(args.model).name} (checkpoint)"
    elif args.recipe:
        options = _options(args)
        model, tokenizer, _, _ = simulated_model(model_dir, options, dtype=dtype)
        label = _components(options, " ")
    else:
        model, tokenizer = load_model(model_dir, dtype=dtype)
        label = "FP"
    tasks = TASKS if args.tasks is None else tuple(t for t in args.tasks.split(",") if t)
    with torch.inference_mode():
        result = evaluate(
            model, tokenizer, seq_len=args.seq_len, tasks=tasks, limit=args.limit, ppl_max_sequences=args.ppl_sequences
        )
    result["label"] = label
    result["model"] = str(args.model)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(results_to_markdown([(label, result)]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hadaquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch-model", help="convert a shipped GGUF model to a bf16 HF directory")
    p.add_argument("name", choices=["smollm2", "qwen2.5-0.5b"])
    p.add_argument("out_dir")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_fetch_model)

    p = sub.add_parser("quantize", help="rotate and quantize a model into a hadaquant checkpoint")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF directory or shipped model name")
    p.add_argument("out_dir", nargs="?", default=None, help="default: runs/<model>-<recipe>")
    _add_recipe_args(p, "w3a3kv3")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--eval-sequences", type=int, default=0, help="then measure perplexity on N held-out windows")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="describe a hadaquant checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print the raw quantization_config")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the per-layer calibration plot here")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model, checkpoint or recipe")
    p.add_argument("model", help="HF directory, hadaquant checkpoint or shipped model name")
    _add_recipe_args(p, None)
    p.add_argument("--tasks", default=None, help="comma-separated subset of lambada,piqa,arc_easy,arc_challenge ('' for none)")
    p.add_argument("--limit", type=int, default=None, help="documents per task")
    p.add_argument("--ppl-sequences", type=int, default=None, help="held-out windows for perplexity")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute dtype of the evaluated model (bfloat16: as vLLM serves it)")
    p.add_argument("--json", default=None, help="write the result JSON here")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
