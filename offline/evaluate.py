"""The evaluation harness: perplexity on held-out Wikipedia text and four zero-shot tasks.

Works on anything that maps ``input_ids [B, T]`` to logits ``[B, T, V]``: a Hugging Face causal
LM, or a simulated-quantization wrapper with the same forward. All model calls go through
:func:`model_logits`, the one place a new kind of model has to fit.

Conventions (those of lm-eval-harness and the QuaRot/GPTQ evaluations, so numbers compare):

- Perplexity: non-overlapping ``seq_len`` windows of the evaluation token stream, mean NLL over
  every predicted token (``seq_len - 1`` per window), exponentiated.
- Zero-shot: each candidate is scored by the summed log-probability of its continuation tokens
  given the context. ``acc`` takes the argmax of that sum, ``acc_norm`` of the sum divided by the
  continuation's length in characters (without the leading space), as lm-eval-harness does.
  LAMBADA: ``acc`` = every target token is the argmax (greedy decoding reproduces the word),
  ``ppl`` = ``exp(-mean over docs of the target's log-likelihood)`` (lm-eval's ``perplexity``).
- The headline accuracy of a task (the markdown columns and ``avg``) is ``acc_norm`` where it
  exists and ``acc`` otherwise, the choice QuaRot's scripts make.
- Tokenization: context and continuation are encoded jointly and split at the context boundary
  (trailing context whitespace moves to the continuation), without special tokens; the
  tokenizer's *default* leading special tokens (BOS for LLaMA-style tokenizers, none for
  GPT-2-style ones) are then prepended to the context, matching how the perplexity stream is
  tokenized. Default *trailing* specials (an EOS some tokenizers append) are never added.

Candidates are not batched by shared context: a prefix-sharing pass needs a KV cache, which a
plain ``input_ids -> logits`` interface does not have (and a quantized-KV simulator would have to
reimplement). Instead requests are sorted by length, grouped under a token budget and
right-padded, which is exact for a causal LM: padding sits after every position that is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import TASKS, Doc, load_task, perplexity_batches

# Markdown column name for each task.
_TASK_COLUMNS = {"lambada": "lambada", "piqa": "piqa", "arc_easy": "arc_e", "arc_challenge": "arc_c"}


def model_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` token ids -> ``[B, T, V]`` logits, for HF models and plain callables alike.

    The one adapter between the harness and a model: HF models return an output object with
    ``.logits``; a simulator may return the tensor itself.
    """
    out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out


def _model_device(model) -> torch.device:
    """Where inputs must live: the first parameter's device, CPU for parameterless callables."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _prepare(model) -> torch.device:
    """Put an ``nn.Module`` in eval mode (dropout off: scores must be deterministic)."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    return _model_device(model)


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def _perplexity_stats(model, tokenizer, seq_len, max_sequences, batch_size, split):
    device = _prepare(model)
    windows = perplexity_batches(tokenizer, seq_len, split=split, max_sequences=max_sequences)
    nll_sum = 0.0
    num_predicted = 0
    for batch in tqdm(windows.split(batch_size), desc=f"ppl@{seq_len}", unit="batch"):
        batch = batch.to(device)
        logits = model_logits(model, batch)
        for row_logits, row_ids in zip(logits, batch):  # row by row: bounds the fp32 copy to [T, V]
            nll = F.cross_entropy(row_logits[:-1].float(), row_ids[1:], reduction="sum")
            nll_sum += nll.item()
            num_predicted += row_ids.numel() - 1
    return math.exp(nll_sum / num_predicted), windows.shape[0], num_predicted


def perplexity(
    model,
    tokenizer,
    seq_len: int = 512,
    max_sequences: int | None = None,
    batch_size: int = 4,
    split: str = "evaluation",
) -> float:
    """Perplexity on the held-out BoolQ passages, in non-overlapping ``seq_len`` windows."""
    return _perplexity_stats(model, tokenizer, seq_len, max_sequences, batch_size, split)[0]


# --------------------------------------------------------------------------------------------
# Zero-shot
# --------------------------------------------------------------------------------------------


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts *before* text by default (e.g. ``[bos]`` or ``[]``)."""
    probe = "Hello world"
    with_special = list(tokenizer(probe).input_ids)
    plain = list(tokenizer(probe, add_special_tokens=False).input_ids)
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    raise ValueError(f"cannot locate the text tokens {plain} inside {with_special}")


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) strings -> (context ids, continuation ids), lm-eval style.

    The continuation ids are the tail of ``encode(context + continuation)`` beyond
    ``len(encode(context))``, so tokens that merge across the boundary are scored as part of the
    continuation the way the model would produce them. Whitespace at the end of the context is
    moved to the start of the continuation first.
    """
    prefix = special_prefix(tokenizer)
    contexts, wholes, continuations = [], [], []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        contexts.append(context)
        wholes.append(context + continuation)
        continuations.append(continuation)
    context_ids = tokenizer(contexts, add_special_tokens=False).input_ids
    whole_ids = tokenizer(wholes, add_special_tokens=False).input_ids
    fallback_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = []
    for ctx, whole, continuation in zip(context_ids, whole_ids, continuations):
        cont = list(whole[len(ctx) :])
        if not cont:  # the boundary merge swallowed the continuation: score it standalone
            cont = list(tokenizer(continuation, add_special_tokens=False).input_ids)
        ctx = prefix + list(ctx)
        if not ctx:  # nothing to condition on: start from BOS/EOS as lm-eval does
            ctx = [fallback_token]
        encoded.append((ctx, cont))
    return encoded


@dataclass(frozen=True)
class _Request:
    tokens: tuple[int, ...]  # context + continuation
    continuation_len: int


def _length_batches(lengths: list[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first into batches of at most ``batch_size`` sequences whose
    padded size (count x longest) stays within ``max_batch_tokens`` (one sequence always fits).

    Longest first, so a batch that does not fit in memory fails at once; a token budget rather
    than a fixed count keeps short requests (ARC answers are ~30 tokens) in large, efficient
    forwards without letting long ones blow up the ``[B, T, V]`` logits.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if current and len(current) < batch_size and (len(current) + 1) * lengths[current[0]] <= max_batch_tokens:
            current.append(i)
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def _score_requests(
    model, requests: list[_Request], batch_size: int, pad_id: int, desc: str, max_batch_tokens: int = 2048
):
    """(sum log p(continuation | context), continuation is the greedy decode) per request.

    The model sees ``tokens[:-1]``: the last token's prediction is never needed.
    """
    device = _model_device(model)
    unique = list(dict.fromkeys(requests))  # identical requests are scored once
    scores: dict[_Request, tuple[float, bool]] = {}
    batches = _length_batches([len(r.tokens) - 1 for r in unique], batch_size, max_batch_tokens)
    for batch_indices in tqdm(batches, desc=desc, unit="batch"):
        batch = [unique[i] for i in batch_indices]
        width = max(len(r.tokens) for r in batch) - 1
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for row, r in enumerate(batch):
            input_ids[row, : len(r.tokens) - 1] = torch.tensor(r.tokens[:-1])
        logits = model_logits(model, input_ids.to(device))
        for row, r in enumerate(batch):
            end = len(r.tokens) - 1  # logits at position t predict token t + 1
            start = end - r.continuation_len
            logprobs = F.log_softmax(logits[row, start:end].float(), dim=-1)
            target = torch.tensor(r.tokens[start + 1 : end + 1], device=logprobs.device)
            loglikelihood = logprobs.gather(-1, target[:, None]).sum().item()
            greedy = bool((logprobs.argmax(-1) == target).all())
            scores[r] = (loglikelihood, greedy)
    return [scores[r] for r in requests]


def zero_shot(
    model,
    tokenizer,
    task: str,
    limit: int | None = None,
    batch_size: int = 64,
    max_batch_tokens: int = 2048,
) -> dict:
    """Accuracy on one zero-shot task (see the module docstring for the metrics).

    A forward holds at most ``batch_size`` requests and ``max_batch_tokens`` padded tokens.

    Returns ``{"acc", "acc_norm" (multiple choice) or "ppl" (LAMBADA), "num_docs",
    "num_requests", "num_tokens" (tokens fed to the model)}``.
    """
    _prepare(model)
    docs: list[Doc] = load_task(task, limit=limit)
    pairs = [(doc.context, cont) for doc in docs for cont in doc.continuations]
    requests = [_Request(tuple(ctx + cont), len(cont)) for ctx, cont in encode_pairs(tokenizer, pairs)]
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    scores = iter(_score_requests(model, requests, batch_size, pad_id, task, max_batch_tokens))
    acc = acc_norm = 0
    target_loglikelihoods = []
    for doc in docs:
        doc_scores = [next(scores) for _ in doc.continuations]
        loglikelihoods = torch.tensor([s[0] for s in doc_scores], dtype=torch.float64)
        if len(doc.continuations) == 1:  # LAMBADA: is the target the greedy continuation?
            acc += doc_scores[0][1]
            target_loglikelihoods.append(doc_scores[0][0])
            continue
        chars = torch.tensor([len(c.removeprefix(" ")) for c in doc.continuations], dtype=torch.float64)
        acc += int(loglikelihoods.argmax()) == doc.gold
        acc_norm += int((loglikelihoods / chars).argmax()) == doc.gold
    result = {"acc": acc / len(docs)}
    if target_loglikelihoods:
        result["ppl"] = math.exp(-sum(target_loglikelihoods) / len(target_loglikelihoods))
    else:
        result["acc_norm"] = acc_norm / len(docs)
    result.update(
        num_docs=len(docs), num_requests=len(requests), num_tokens=sum(len(r.tokens) - 1 for r in requests)
    )
    return result


def headline_accuracy(task_result: dict) -> float:
    """The one accuracy a task is reported by: ``acc_norm`` if measured, else ``acc``."""
    return task_result.get("acc_norm", task_result["acc"])


# --------------------------------------------------------------------------------------------
# Everything, and the table
# --------------------------------------------------------------------------------------------


def evaluate(
    model,
    tokenizer,
    *,
    seq_len: int = 512,
    tasks: tuple[str, ...] = TASKS,
    limit: int | None = None,
    ppl_max_sequences: int | None = None,
    ppl_batch_size: int = 4,
    task_batch_size: int = 64,
    task_max_batch_tokens: int = 2048,
) -> dict:
    """Perplexity plus zero-shot accuracies, as a JSON-serializable dict.

    ``limit`` caps every task at its first N docs; ``ppl_max_sequences`` caps the perplexity
    windows (0 skips perplexity). ``avg`` is the mean headline accuracy of the tasks run;
    ``avg_over`` names them, so a partial run is never mistaken for the four-task average.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {TASKS}")
    result: dict = {"seq_len": seq_len, "limit": limit}
    if ppl_max_sequences == 0:
        result.update(perplexity=None, ppl_sequences=0, ppl_tokens=0)
    else:
        ppl, num_seq, num_tokens = _perplexity_stats(
            model, tokenizer, seq_len, ppl_max_sequences, ppl_batch_size, "evaluation"
        )
        result.update(perplexity=ppl, ppl_sequences=num_seq, ppl_tokens=num_tokens)
    result["tasks"] = {
        task: zero_shot(
            model, tokenizer, task, limit=limit, batch_size=task_batch_size, max_batch_tokens=task_max_batch_tokens
        )
        for task in tasks
    }
    accuracies = [headline_accuracy(r) for r in result["tasks"].values()]
    result["avg"] = sum(accuracies) / len(accuracies) if accuracies else None
    result["avg_over"] = list(tasks)
    return result


def _format_ppl(ppl: float | None) -> str:
    if ppl is None:
        return "–"
    return f"{ppl:.2f}" if ppl < 1000 else f"{ppl:,.0f}"


def results_to_markdown(rows: list[tuple[str, dict]]) -> str:
    """One markdown row per configuration: perplexity, headline accuracies in %, their average.

    The average is marked with ``*`` when it does not cover all four tasks.
    """
    columns = ["ppl", *_TASK_COLUMNS.values(), "avg"]
    lines = ["| config | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, result in rows:
        cells = [_format_ppl(result.get("perplexity"))]
        for task in _TASK_COLUMNS:
            task_result = result.get("tasks", {}).get(task)
            cells.append("–" if task_result is None else f"{100 * headline_accuracy(task_result):.1f}")
        avg = result.get("avg")
        partial = set(result.get("avg_over", ())) != set(TASKS)
        cells.append("–" if avg is None else f"{100 * avg:.1f}" + ("*" if partial else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
