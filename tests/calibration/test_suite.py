"""The offline long-context suite: exact lengths, answers present in the prompt, determinism, scoring."""

from __future__ import annotations

import pytest

from tsa_patch.suite import TASKS, Sample, SuiteBuilder


@pytest.fixture(scope="module")
def builder(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    return SuiteBuilder(tokenizer, seed=0), tokenizer


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("task", TASKS)
def test_samples_hit_the_length_and_hold_their_answers(builder, task, length):
    suite, tokenizer = builder
    sample = suite.sample(task, length, 0)
    tokens = len(tokenizer(sample.prompt(tokenizer), add_special_tokens=False).input_ids)
    assert 0.9 * length <= tokens <= length, tokens
    if task in ("cwe", "fwe"):  # the answers are the most frequent words of the context
        words = sample.context.replace(".", " ").split()
        counts = {w: words.count(w) for w in set(words)}
        frequent = sorted(counts, key=counts.get, reverse=True)
        assert set(sample.answers) <= set(frequent[:6])
    else:
        assert all(answer in sample.context for answer in sample.answers)
    assert sample.prompt(tokenizer).endswith(sample.answer_prefix)


def test_samples_are_deterministic_and_distinct(builder):
    suite, _ = builder
    assert suite.sample("niah_single", 1024, 3) == suite.sample("niah_single", 1024, 3)
    assert suite.sample("niah_single", 1024, 3) != suite.sample("niah_single", 1024, 4)
    assert SuiteBuilder(suite.tokenizer, seed=1).sample("vt", 1024, 0) != suite.sample("vt", 1024, 0)


def test_score_is_the_fraction_of_answers_found():
    sample = Sample(task="t", length=1, index=0, context="", answer_prefix="", answers=("1234", "abc"),
                    max_new_tokens=4)
    assert sample.score("x 1234 ABC") == 1.0 and sample.score("1234") == 0.5 and sample.score("") == 0.0


def test_unknown_task_is_rejected(builder):
    with pytest.raises(ValueError, match="unknown task"):
        builder[0].sample("summarise", 1024, 0)
