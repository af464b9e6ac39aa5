"""Run one vLLM engine on a checkpoint and write what the tests compare, as JSON.

The tests start this with the venv's python in a subprocess: a vLLM engine spawns its own
engine-core process and sets process-wide state (distributed groups, signal handlers), which a
pytest process should not inherit. The plugin is found the way users find it, through the
``vllm.general_plugins`` entry point; nothing here imports ``hq_vllm``.

Usage: ``python tests/vllm_runner.py REQUEST.json`` where the request is::

    {"model": CKPT_DIR, "out": RESULT.json, "dtype": "float32",
     "quantization": null | "hadaquant",      # null: auto-detected from config.json
     "prompts": [[token ids], ...], "max_tokens": 16,
     "ppl_windows": [[token ids], ...],      # optional: prompt log-probs of these windows
     "bad_models": [{"name": str, "model": DIR, "quantization": ...}, ...]}  # optional

and the result is ``{"tokens": [[generated ids], ...], "nll_sum": float, "num_predicted": int,
"top1": [[most likely token at each window position 1..], ...], "quantization": str,
"seconds": {...}, "bad_models": {name: "failed" | "loaded"}}``.

``bad_models`` are broken checkpoints that must fail while vLLM builds its config, before any
engine process starts; trying them first in this process spares the tests one vLLM start-up
(~15 s of imports on 2 cores) each. Each attempt's traceback goes to stderr between
``=== bad model NAME ===`` and ``=== end NAME ===`` lines, for the tests to search. A failure to
load ``model`` itself exits non-zero with vLLM's traceback on stderr.
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def _make_llm(req: dict, model: str, quantization: str | None):
    from vllm import LLM

    kwargs = {} if quantization is None else {"quantization": quantization}
    return LLM(
        model=model,
        dtype=req.get("dtype", "float32"),
        enforce_eager=True,
        max_model_len=req.get("max_model_len", 512),
        seed=0,
        **kwargs,
    )


def main(request_path: str) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    req = json.loads(open(request_path).read())
    bad_results = {}
    for bad in req.get("bad_models", []):
        print(f"=== bad model {bad['name']} ===", file=sys.stderr, flush=True)
        try:
            _make_llm(req, bad["model"], bad.get("quantization"))
            bad_results[bad["name"]] = "loaded"
        except Exception:
            traceback.print_exc(file=sys.stderr)
            bad_results[bad["name"]] = "failed"
        print(f"=== end {bad['name']} ===", file=sys.stderr, flush=True)

    start = time.perf_counter()
    llm = _make_llm(req, req["model"], req.get("quantization"))
    loaded = time.perf_counter()
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=req.get("max_tokens", 16), ignore_eos=True)
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "quantization": llm.llm_engine.vllm_config.model_config.quantization,
        "bad_models": bad_results,
    }
    generated = time.perf_counter()
    windows = req.get("ppl_windows") or []
    if windows:
        # prompt_logprobs=1: each position's entry holds the top-1 token (rank 1) and the token
        # actually in the prompt; prompt_logprobs[0] is None (nothing predicts the first token).
        score = SamplingParams(prompt_logprobs=1, max_tokens=1)
        outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], score, use_tqdm=False)
        nll, count, top1 = 0.0, 0, []
        for window, out in zip(windows, outs):
            row = []
            for pos, lp in enumerate(out.prompt_logprobs[1:], start=1):
                nll -= lp[window[pos]].logprob
                count += 1
                row.append(next(t for t, v in lp.items() if v.rank == 1))
            top1.append(row)
        result["nll_sum"], result["num_predicted"], result["top1"] = nll, count, top1
    result["seconds"] = {
        "load": loaded - start,
        "generate": generated - loaded,
        "score": time.perf_counter() - generated,
    }
    with open(req["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
