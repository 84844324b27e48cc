"""dpo_core.metrics (maths on arrays), dpo_core.evaluation (evaluate_preferences, compare_generations, judged_answers)
data_contracts.evaluation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_contracts.errors import ContractError
from data_contracts.evaluation import GENERATION_COLUMNS, METRIC_COLUMNS, validate_generations, validate_metrics
from dpo_core.batching import collate_pairs
from dpo_core.config import EvalConfig, ModelConfig
from dpo_core.evaluation import compare_generations, evaluate_preferences, judged_answers
from dpo_core.logprobs import sequence_logps
from dpo_core.metrics import (
    EvaluationError,
    bootstrap_ci,
    bootstrap_ci_of,
    distinct_n,
    generation_metrics,
    length_controlled_win_rate,
    length_ratio,
    longest_repeated_ngram,
    pairwise_accuracy,
    preference_metrics,
    preference_probability,
    trl_metric_names,
    win_rate,
)
from dpo_core.models import pick_device, tiny_llama
from dpo_core.reference import compute_reference_logps
from dpo_core.templating import tokenize_pairs

SPEC = pick_device(ModelConfig(device="cpu"))


# ----------------------------------------------------------------------------------------------------------------------
# metric maths on hand-made log-probs
# ----------------------------------------------------------------------------------------------------------------------


def test_preference_metrics_by_hand():
    # rewards = beta * (policy - ref): chosen [0.25, 0, -0.5], rejected [-0.25, 0, 0.5]; margins [0.5, 0, -1]
    m = preference_metrics(
        [-1.0, -2.0, -3.0], [-2.0, -2.0, -1.0], [-1.5, -2.0, -2.0], [-1.5, -2.0, -2.0], beta=0.5,
        bootstrap_samples=200, seed=0,
    )
    assert m["n_pairs"] == 3 and m["beta"] == 0.5
    assert m["reward_accuracy"] == pytest.approx(1 / 3)  # strict: the tied pair does not count
    assert m["reward_tie_rate"] == pytest.approx(1 / 3)
    assert m["margin_mean"] == pytest.approx((0.5 + 0 - 1) / 3)
    assert m["chosen_reward_mean"] == pytest.approx((0.25 + 0 - 0.5) / 3)
    assert m["rejected_reward_mean"] == pytest.approx((-0.25 + 0 + 0.5) / 3)
    assert m["policy_chosen_logps_mean"] == pytest.approx(-2.0)
    assert m["policy_rejected_logps_mean"] == pytest.approx(-5 / 3)
    assert m["policy_accuracy"] == pytest.approx(1 / 3)  # -1 > -2 only
    assert m["reference_accuracy"] == 0.0  # the reference ties everywhere
    assert m["reward_accuracy_ci_low"] <= m["reward_accuracy"] <= m["reward_accuracy_ci_high"]
    validate_metrics(pd.DataFrame([{"eval_set": "eval", **m, "chosen_tokens_mean": 3.0, "rejected_tokens_mean": 4.0}]))


def test_preference_metrics_policy_equal_to_reference_scores_zero_with_full_ties():
    logps = np.array([-3.0, -1.0, -2.0])
    m = preference_metrics(logps, logps - 1, logps, logps - 1, beta=0.1, bootstrap_samples=50)
    assert m["reward_accuracy"] == 0.0 and m["reward_tie_rate"] == 1.0 and m["margin_mean"] == 0.0
    assert m["reference_accuracy"] == m["policy_accuracy"] == 1.0
    assert (m["reward_accuracy_ci_low"], m["reward_accuracy_ci_high"]) == (0.0, 0.0)


@pytest.mark.parametrize(
    "args, message",
    [
        (([], [], [], []), "at least one pair"),
        (([-1.0], [-1.0, -2.0], [-1.0], [-1.0]), "differ in length"),
        (([float("nan")], [-1.0], [-1.0], [-1.0]), "non-finite"),
    ],
)
def test_preference_metrics_bad_input(args, message):
    with pytest.raises(EvaluationError, match=message):
        preference_metrics(*args, beta=0.1)


def test_bootstrap_ci_reproducible_and_close_to_the_normal_approximation():
    values = np.array([1.0] * 200 + [0.0] * 200)
    low, high = bootstrap_ci(values, n_samples=4000, confidence=0.95, seed=3)
    assert (low, high) == bootstrap_ci(values, n_samples=4000, confidence=0.95, seed=3)
    half = 1.96 * math.sqrt(0.25 / 400)  # ~0.049
    assert low == pytest.approx(0.5 - half, abs=0.01) and high == pytest.approx(0.5 + half, abs=0.01)
    narrow = bootstrap_ci(values, n_samples=4000, confidence=0.5, seed=3)
    assert low < narrow[0] < narrow[1] < high
    assert bootstrap_ci([1.0, 1.0, 1.0], n_samples=10, confidence=0.9, seed=0) == (1.0, 1.0)
    with pytest.raises(EvaluationError, match="confidence"):
        bootstrap_ci(values, n_samples=10, confidence=1.0, seed=0)


def test_bootstrap_ci_of_a_mean_draws_the_same_resamples_as_bootstrap_ci():
    values = np.random.default_rng(0).normal(size=37)
    expected = bootstrap_ci(values, n_samples=300, confidence=0.9, seed=4)
    assert bootstrap_ci_of(lambda i: values[i].mean(), 37, n_samples=300, confidence=0.9, seed=4) == pytest.approx(
        expected, abs=1e-12)
    # resamples whose statistic is undefined are left out; none defined: NaN ends
    assert all(math.isnan(x) for x in bootstrap_ci_of(lambda i: math.nan, 5, n_samples=10, confidence=0.9, seed=0))


def test_pairwise_accuracy_is_strict_and_brackets_itself():
    acc = pairwise_accuracy([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, 4.0], n_samples=200, seed=1)
    assert acc["accuracy"] == 0.5 and acc["tie_rate"] == 0.25 and acc["n_pairs"] == 4
    assert 0.0 <= acc["ci_low"] <= 0.5 <= acc["ci_high"] <= 1.0
    with pytest.raises(EvaluationError, match="differ in length"):
        pairwise_accuracy([1.0], [1.0, 2.0])


def _comparison_columns(policy_scores, reference_scores, policy_tokens, reference_tokens) -> dict:
    n = len(policy_tokens)
    return {"policy_judge_score": policy_scores, "reference_judge_score": reference_scores,
            "policy_tokens": policy_tokens, "reference_tokens": reference_tokens,
            "policy_stopped_at_eos": [i % 2 == 0 for i in range(n)], "reference_stopped_at_eos": [True] * n,
            "policy_distinct_2": np.linspace(0.5, 1.0, n), "reference_distinct_2": np.ones(n),
            "policy_longest_repeat": [i % 3 for i in range(n)], "reference_longest_repeat": [0] * n}


def _longer_policy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Answer lengths in tokens where the policy answers longer on about 80% of the prompts (DPO's failure mode)."""
    rng = np.random.default_rng(seed)
    reference = rng.integers(10, 60, n).astype(float)
    policy = np.clip(reference + np.round(rng.normal(15.0, 18.0, n)), 1, None)
    return policy, reference


@pytest.mark.parametrize("tokens_per_logit", [1.0, 10.0])
def test_length_controlled_win_rate_of_a_judge_that_only_counts_length_is_one_half(tokens_per_logit):
    """A judge whose score is the answer length (one logit per 1 or per 10 tokens) prefers the longer answer and
    nothing else: its raw win rate is high, its length-controlled win rate ~0.5."""
    policy, reference = _longer_policy(64, seed=0)
    stats = generation_metrics(_comparison_columns(policy / tokens_per_logit, reference / tokens_per_logit, policy,
                                                   reference), n_samples=300, seed=0)
    assert stats["win_rate"] > 0.75 and stats["win_rate_soft"] > 0.7 and stats["length_ratio"] > 1.2
    assert stats["lc_win_rate"] == pytest.approx(0.5, abs=0.03)
    assert stats["lc_win_rate_ci_low"] <= stats["lc_win_rate"] <= stats["lc_win_rate_ci_high"]


def test_length_controlled_win_rate_keeps_a_preference_that_is_not_length():
    """A judge that likes the policy by a constant logit whatever the lengths: controlling for length changes nothing."""
    policy, reference = _longer_policy(64, seed=1)
    noise = np.random.default_rng(2).normal(0.0, 0.3, 64)
    stats = generation_metrics(_comparison_columns(1.0 + noise, np.zeros(64), policy, reference), n_samples=300)
    assert stats["win_rate_soft"] == pytest.approx(float(np.mean(1 / (1 + np.exp(-(1.0 + noise))))))
    assert stats["lc_win_rate"] == pytest.approx(stats["win_rate_soft"], abs=0.03)
    # no spread in length differences: the fit has nothing to control for and returns the mean preference
    prefs = preference_probability([0.2, 1.0, -0.5], [0.0, 0.0, 0.0])
    assert length_controlled_win_rate(prefs, [3.0, 3.0, 3.0]) == pytest.approx(prefs.mean(), abs=1e-6)
    with pytest.raises(EvaluationError, match=r"\[0, 1\]"):
        length_controlled_win_rate([1.5], [0.0])


def test_generation_metrics_by_hand():
    cols = _comparison_columns([3.0, 1.0, 2.0, 2.0], [1.0, 2.0, 2.0, 0.0], [10, 20, 30, 40], [10, 10, 10, 10])
    stats = generation_metrics(cols, n_samples=500, confidence=0.9, seed=3)
    assert (stats["policy_wins"], stats["reference_wins"], stats["ties"]) == (2, 1, 1)
    assert stats["win_rate"] == pytest.approx(2.5 / 4)
    assert stats["length_ratio"] == pytest.approx(2.5) and stats["policy_tokens_mean"] == 25.0
    assert stats["policy_eot_rate"] == 0.5 and stats["reference_eot_rate"] == 1.0
    assert stats["reference_eot_rate_ci_low"] == stats["reference_eot_rate_ci_high"] == 1.0
    assert stats["policy_longest_repeat_mean"] == pytest.approx(0.75)
    for key in ("win_rate", "win_rate_soft", "lc_win_rate", "length_ratio", "policy_eot_rate",
                "policy_distinct_2_mean", "policy_longest_repeat_mean", "reference_tokens_mean"):
        assert stats[f"{key}_ci_low"] <= stats[key] <= stats[f"{key}_ci_high"], key
    with pytest.raises(EvaluationError, match="column 'policy_tokens'"):
        generation_metrics({k: v for k, v in cols.items() if k != "policy_tokens"})


def _brute_longest_repeat(seq: list[int]) -> int:
    best = 0
    for n in range(1, len(seq)):
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        if len(set(grams)) < len(grams):
            best = n
    return best


def test_repetition_statistics():
    assert distinct_n([1, 2, 1, 2, 1], 2) == 0.5  # (1,2),(2,1),(1,2),(2,1)
    assert distinct_n([1, 2, 3, 4], 2) == 1.0
    assert distinct_n([7], 2) == 1.0  # no bigram, nothing repeated
    assert longest_repeated_ngram([1, 2, 1, 2, 1]) == 3  # "1 2 1" at 0 and 2 (overlapping)
    assert longest_repeated_ngram([5, 5, 5]) == 2
    assert longest_repeated_ngram([1, 2, 3]) == 0 and longest_repeated_ngram([]) == 0
    rng = np.random.default_rng(0)
    for _ in range(50):
        seq = rng.integers(0, 3, size=int(rng.integers(0, 14))).tolist()
        assert longest_repeated_ngram(seq) == _brute_longest_repeat(seq)


def test_win_rate_length_ratio_and_trl_names():
    rate, winners = win_rate([1.0, 0.0, 0.5], [0.0, 1.0, 0.5])
    assert winners == ["policy", "reference", "tie"] and rate == pytest.approx(0.5)
    assert win_rate([2.0, 2.0], [1.0, 2.0 + 1e-9])[0] == pytest.approx(0.75)
    assert length_ratio([20, 40], [15, 15]) == pytest.approx(2.0)
    assert math.isnan(length_ratio([3], [0]))  # every reference answer empty: no length to compare with
    with pytest.raises(EvaluationError, match="at least one length"):
        length_ratio([], [1])
    names = trl_metric_names({"reward_accuracy": 0.6, "margin_mean": 0.1, "n_pairs": 8})
    assert names == {"eval_rewards/accuracies": 0.6, "eval_rewards/margins": 0.1}


def test_metrics_module_needs_no_torch():
    """dpo_core.metrics works on arrays alone: importing it loads neither torch nor any model code."""
    code = "import sys, dpo_core.metrics; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------------------------------
# evaluate_preferences on a tiny model
# ----------------------------------------------------------------------------------------------------------------------

PAIRS = pd.DataFrame(
    {
        "pair_id": [f"p{i}" for i in range(5)],
        "prompt": [
            [{"role": "user", "content": "What is two plus two?"}],
            [{"role": "user", "content": "Name a fruit."}],
            [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Say hello in French."}],
            [{"role": "user", "content": "Give me a word that rhymes with cat, and explain briefly why it rhymes."}],
            [{"role": "user", "content": "Is the sky blue?"}],
        ],
        "chosen": ["Four.", "An apple.", "Bonjour.", "Hat: both end in the sound 'at'.", "Yes, on a clear day."],
        "rejected": ["Five.", "A car.", "Hello.", "Dog.", "No, it is always green and also made of cheese."],
        "source": "test",
        "meta": "{}",
        "split": "eval",
    }
)


@pytest.fixture()
def tokenized(tokenizer) -> pd.DataFrame:
    df, report = tokenize_pairs(PAIRS, tokenizer, max_length=96, max_prompt_length=64)
    assert report.tokenized == len(PAIRS)
    return df


def test_evaluate_preferences_matches_per_pair_scoring(tokenizer, tokenized):
    reference = tiny_llama(tokenizer, seed=0)
    policy = tiny_llama(tokenizer, seed=1)
    ref_df = compute_reference_logps(reference, tokenized, batch_size=2, spec=SPEC).iloc[::-1]  # order is by pair_id
    record = evaluate_preferences(
        policy, tokenized, reference_df=ref_df, beta=0.2, batch_size=2, spec=SPEC, chunk_size=7,
        bootstrap_samples=100, confidence=0.9, seed=1, eval_set="heldout",
    )
    # independent: each pair alone, no batching, no length sorting
    by_pair = {}
    for row in tokenized.to_dict("records"):
        batch = collate_pairs([row], pad_id=0)
        with torch.no_grad():
            pol, _ = sequence_logps(policy, batch)
            ref, _ = sequence_logps(reference, batch)
        by_pair[row["pair_id"]] = (pol.double().numpy(), ref.double().numpy())
    pc, pr = (np.array([by_pair[p][0][k] for p in tokenized["pair_id"]]) for k in (0, 1))
    rc, rr = (np.array([by_pair[p][1][k] for p in tokenized["pair_id"]]) for k in (0, 1))
    expected = preference_metrics(pc, pr, rc, rr, 0.2, bootstrap_samples=100, confidence=0.9, seed=1)
    assert record["eval_set"] == "heldout" and record["n_pairs"] == len(PAIRS)
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, abs=1e-4), key
    assert record["chosen_tokens_mean"] == pytest.approx(np.mean([len(x) for x in tokenized["chosen_ids"]]))
    frame = validate_metrics(pd.DataFrame([record]))
    assert list(frame.columns) == METRIC_COLUMNS


def test_evaluate_preferences_policy_equal_to_reference(tokenizer, tokenized, tiny_model):
    ref_df = compute_reference_logps(tiny_model, tokenized, batch_size=4, spec=SPEC)
    record = evaluate_preferences(
        tiny_model, tokenized, reference_df=ref_df, beta=0.1, batch_size=3, spec=SPEC, bootstrap_samples=50
    )
    assert record["margin_mean"] == pytest.approx(0.0, abs=1e-5)
    assert record["reference_accuracy"] == record["policy_accuracy"]
    assert record["reference_chosen_logps_mean"] == pytest.approx(record["policy_chosen_logps_mean"], abs=1e-4)


def test_evaluate_preferences_errors(tokenizer, tokenized, tiny_model):
    ref_df = compute_reference_logps(tiny_model, tokenized, batch_size=4, spec=SPEC)
    kwargs = dict(beta=0.1, batch_size=2, spec=SPEC, eval_set="hh")
    with pytest.raises(EvaluationError, match="eval set 'hh' has zero valid pairs"):
        evaluate_preferences(tiny_model, tokenized.iloc[:0], reference_df=ref_df, **kwargs)
    with pytest.raises(EvaluationError, match="2 of 5 pairs have no reference log-probs"):
        evaluate_preferences(tiny_model, tokenized, reference_df=ref_df.iloc[2:], **kwargs)
    shifted = ref_df.assign(chosen_tokens=ref_df["chosen_tokens"] + 1)
    with pytest.raises(EvaluationError, match="different tokenization"):
        evaluate_preferences(tiny_model, tokenized, reference_df=shifted, **kwargs)
    with pytest.raises(EvaluationError, match="repeats pair_id"):
        evaluate_preferences(tiny_model, tokenized, reference_df=pd.concat([ref_df, ref_df]), **kwargs)
    with pytest.raises(EvaluationError, match="missing column"):
        evaluate_preferences(tiny_model, tokenized.drop(columns="chosen_ids"), reference_df=ref_df, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# compare_generations on tiny models
# ----------------------------------------------------------------------------------------------------------------------


class LengthJudge:
    """A transparent test judge: longer answers score higher."""

    name = "answer-length (test)"
    uses_references = False

    def score(self, prompts, answers, chosen, rejected):
        return [float(len(a)) for a in answers]


def _eval_cfg(**kw) -> EvalConfig:
    base = dict(n_generations=3, generation_batch_size=2, max_new_tokens=6, batch_size=2, do_sample=True,
                temperature=1.0, top_p=1.0, seed=5)
    return EvalConfig(**{**base, **kw})


def test_compare_generations_table_scores_and_summary(tokenizer):
    reference = tiny_llama(tokenizer, seed=0)
    policy = tiny_llama(tokenizer, seed=1)
    validity = {"validity": 0.7, "validity_ci_low": 0.6, "validity_ci_high": 0.8, "validated": True, "note": "test"}
    table, summary = compare_generations(
        policy, reference, tokenizer, PAIRS, eval_cfg=_eval_cfg(), beta=0.5, judge=LengthJudge(),
        judge_validity=validity, spec=SPEC,
    )
    table = validate_generations(table)
    assert list(table.columns) == GENERATION_COLUMNS
    assert table["pair_id"].tolist() == ["p0", "p1", "p2"]
    assert table["chosen"].tolist() == PAIRS["chosen"][:3].tolist()
    assert json.loads(table["prompt_messages"][2])[0] == {"role": "system", "content": "Be terse."}
    assert table["prompt"][2] == "Say hello in French."
    assert (table["judge"] == "answer-length (test)").all() and summary["judge"] == "answer-length (test)"

    # the implicit reward of the policy's first answer, by hand from the generated tokens
    from dpo_core.generation import generate
    from dpo_core.templating import render_prompt_ids

    # same batch composition as inside compare_generations (sampling draws depend on it)
    gens = generate(policy, tokenizer, list(PAIRS["prompt"][:2]), max_new_tokens=6, do_sample=True, seed=5, batch_size=2)
    assert [g.text for g in gens] == table["policy_answer"][:2].tolist()
    row = {"pair_id": "x", "prompt_ids": render_prompt_ids(PAIRS["prompt"][0], tokenizer, None),
           "chosen_ids": gens[0].token_ids, "rejected_ids": gens[0].token_ids}
    with torch.no_grad():
        lp_pol = sequence_logps(policy, collate_pairs([row], 0))[0][0].item()
        lp_ref = sequence_logps(reference, collate_pairs([row], 0))[0][0].item()
    assert table["policy_implicit_reward"][0] == pytest.approx(0.5 * (lp_pol - lp_ref), abs=1e-4)

    winners = ["tie" if a == b else ("policy" if a > b else "reference")
               for a, b in zip(table["policy_answer"].str.len(), table["reference_answer"].str.len())]
    assert table["winner"].tolist() == winners
    assert summary["win_rate"] == pytest.approx((winners.count("policy") + 0.5 * winners.count("tie")) / 3)
    assert summary["length_ratio"] == pytest.approx(table["policy_tokens"].mean() / table["reference_tokens"].mean())
    assert summary["policy_eot_rate"] == table["policy_stopped_at_eos"].mean()
    assert summary["n_prompts"] == 3
    # the judge's validity rides beside its win rates; every rate has its bootstrap CI
    assert (summary["judge_validity"], summary["judge_validity_ci_low"], summary["judge_validity_ci_high"]) == (
        0.7, 0.6, 0.8)
    assert summary["judge_validated"] is True and summary["judge_validity_note"] == "test"
    for key in ("win_rate", "lc_win_rate", "length_ratio", "policy_eot_rate", "policy_distinct_2_mean"):
        assert summary[f"{key}_ci_low"] <= summary[key] <= summary[f"{key}_ci_high"]


def test_compare_generations_renders_each_prompt_once_and_answers_as_generate_does(tokenizer, monkeypatch):
    """Both models decode from one rendering of the prompts; each model's answers are exactly what `generate` gives
    it alone (same prompts, settings and seed)."""
    from dpo_core.generation import generate
    from dpo_core.templating import ChatRenderer

    reference, policy = tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=1)
    rendered = []
    prompt_text = ChatRenderer.prompt_text
    with monkeypatch.context() as patched:
        patched.setattr(ChatRenderer, "prompt_text",
                        lambda self, prompt: rendered.append(prompt) or prompt_text(self, prompt))
        table, _ = compare_generations(policy, reference, tokenizer, PAIRS, eval_cfg=_eval_cfg(n_generations=4),
                                       beta=0.5, judge=LengthJudge(), spec=SPEC, max_prompt_length=12)
    assert len(rendered) == 4
    settings = dict(max_new_tokens=6, do_sample=True, temperature=1.0, top_p=1.0, seed=5, batch_size=2, spec=SPEC,
                    max_prompt_length=12)
    for model, side in ((policy, "policy"), (reference, "reference")):
        alone = generate(model, tokenizer, list(PAIRS["prompt"][:4]), **settings)
        assert [g.text for g in alone] == table[f"{side}_answer"].tolist()
        assert [len(g.content_ids) for g in alone] == table[f"{side}_tokens"].tolist()
    assert [g.prompt_tokens for g in alone] == table["prompt_tokens"].tolist()


def test_judged_answers_decode_and_judge_a_model_as_the_comparison_does(tokenizer):
    """A third model (the champion, in the promotion gate) answers beside a comparison: with the policy in its place
    it reproduces the comparison's policy answers and judge scores exactly."""
    reference, policy = tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=1)
    table, _ = compare_generations(policy, reference, tokenizer, PAIRS, eval_cfg=_eval_cfg(), beta=0.5,
                                   judge=LengthJudge(), spec=SPEC, max_prompt_length=12)
    answers = judged_answers(policy, tokenizer, PAIRS, eval_cfg=_eval_cfg(), judge=LengthJudge(), spec=SPEC,
                             max_prompt_length=12)
    assert answers["pair_id"].tolist() == table["pair_id"].tolist()
    assert answers["answer"].tolist() == table["policy_answer"].tolist()
    assert answers["judge_score"].tolist() == table["policy_judge_score"].tolist()
    assert answers["answer_tokens"].tolist() == table["policy_tokens"].tolist()


def test_compare_generations_policy_equal_to_reference(tokenizer, tiny_model):
    table, summary = compare_generations(
        tiny_model, tiny_model, tokenizer, PAIRS, eval_cfg=_eval_cfg(n_generations=10), beta=0.1,
        judge=LengthJudge(), spec=SPEC, max_prompt_length=12,
    )
    assert len(table) == len(PAIRS)  # n_generations larger than the set: every prompt, once
    assert (table["policy_answer"] == table["reference_answer"]).all()  # same seed, same settings
    assert np.allclose(table["policy_implicit_reward"], 0.0) and np.allclose(table["reference_implicit_reward"], 0.0)
    assert summary["win_rate"] == 0.5 and summary["ties"] == len(PAIRS) and summary["length_ratio"] == 1.0
    assert (table["prompt_tokens"] == 12).all()


def test_compare_generations_builds_the_configured_similarity_judge(tokenizer, tiny_model):
    eval_cfg = _eval_cfg(n_generations=2, judge={"kind": "similarity"})
    table, summary = compare_generations(
        tiny_model, tiny_llama(tokenizer, seed=2), tokenizer, PAIRS, eval_cfg=eval_cfg, beta=0.1, spec=SPEC,
    )
    validate_generations(table)
    assert "all-MiniLM-L6-v2" in summary["judge"] and "unvalidated" in summary["judge"]
    assert table["policy_judge_score"].between(-2, 2).all()
    assert summary["judge_validity"] is None and summary["judge_validated"] is False


def test_compare_generations_errors(tokenizer, tiny_model):
    kwargs = dict(beta=0.1, judge=LengthJudge(), spec=SPEC)
    with pytest.raises(EvaluationError, match="zero held-out pairs"):
        compare_generations(tiny_model, tiny_model, tokenizer, PAIRS.iloc[:0], eval_cfg=_eval_cfg(), **kwargs)
    with pytest.raises(EvaluationError, match="n_generations is 0"):
        compare_generations(tiny_model, tiny_model, tokenizer, PAIRS, eval_cfg=_eval_cfg(n_generations=0), **kwargs)
    bad = PAIRS.assign(prompt=[[{"role": "assistant", "content": "x"}]] * len(PAIRS))
    with pytest.raises(EvaluationError, match="pair p0: its prompt cannot be rendered"):
        compare_generations(tiny_model, tiny_model, tokenizer, bad, eval_cfg=_eval_cfg(), **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# contracts
# ----------------------------------------------------------------------------------------------------------------------


def _metrics_row(**kw) -> dict:
    m = preference_metrics([-1.0, -2.0], [-2.0, -1.0], [-1.5, -1.5], [-1.5, -1.5], beta=0.1, bootstrap_samples=20)
    return {"eval_set": "eval", **m, "chosen_tokens_mean": 5.0, "rejected_tokens_mean": 6.0, **kw}


def test_metrics_contract_rejects_bad_records():
    with pytest.raises(ContractError, match="reward_accuracy: less_than_or_equal_to") as err:
        validate_metrics(pd.DataFrame([_metrics_row(reward_accuracy=1.5, reward_accuracy_ci_high=1.5)]))
    assert "eval" in str(err.value)
    with pytest.raises(ContractError, match="inside"):
        validate_metrics(pd.DataFrame([_metrics_row(reward_accuracy_ci_low=0.9, reward_accuracy_ci_high=0.95)]))
    with pytest.raises(ContractError, match="margin_mean must equal"):
        validate_metrics(pd.DataFrame([_metrics_row(margin_mean=3.0)]))
    with pytest.raises(ContractError, match="duplicate|field_uniqueness"):
        validate_metrics(pd.DataFrame([_metrics_row(), _metrics_row()]))
    with pytest.raises(ContractError, match="missing column n_pairs"):
        validate_metrics(pd.DataFrame([_metrics_row()]).drop(columns="n_pairs"))
    with pytest.raises(ContractError, match="no rows"):
        validate_metrics(pd.DataFrame(columns=METRIC_COLUMNS))


def test_generations_contract_rejects_bad_rows(tokenizer, tiny_model):
    table, _ = compare_generations(
        tiny_model, tiny_model, tokenizer, PAIRS, eval_cfg=_eval_cfg(n_generations=2), beta=0.1,
        judge=LengthJudge(), spec=SPEC,
    )
    validate_generations(table)
    with pytest.raises(ContractError, match="winner: isin") as err:
        validate_generations(table.assign(winner=["policy", "nobody"]))
    assert "p1" in str(err.value)
    with pytest.raises(ContractError, match="finite"):
        validate_generations(table.assign(policy_implicit_reward=[0.0, float("nan")]))
    with pytest.raises(ContractError, match="unexpected column extra"):
        validate_generations(table.assign(extra=1))
    with pytest.raises(ContractError, match="one judge"):
        validate_generations(table.assign(judge=["a", "b"]))



def test_unpaired_metrics_count_how_often_the_reward_sign_agrees_with_the_label():
    from dpo_core.metrics import unpaired_metrics

    # rewards 0.1 * (policy - ref) = [0.2, -0.1, -0.3, 0.0, 0.1]; labels desirable, desirable, undesirable x 3
    m = unpaired_metrics([-8.0, -11.0, -13.0, -5.0, -9.0], [-10.0, -10.0, -10.0, -5.0, -10.0],
                         [True, True, False, False, False], 0.1, bootstrap_samples=200, seed=0)
    assert (m["n_rows"], m["n_desirable"]) == (5, 2)
    assert m["desirable_positive_rate"] == 0.5 and m["undesirable_negative_rate"] == pytest.approx(1 / 3)
    assert m["sign_accuracy"] == pytest.approx(2 / 5)  # a reward of exactly 0 agrees with neither label
    assert m["sign_accuracy_ci_low"] <= m["sign_accuracy"] <= m["sign_accuracy_ci_high"]
    assert m["desirable_reward_mean"] == pytest.approx(0.05) and m["undesirable_reward_mean"] == pytest.approx(-0.2 / 3)
    assert m["reward_gap"] == pytest.approx(0.05 + 0.2 / 3)
    only_desirable = unpaired_metrics([-1.0], [-2.0], [True], 0.1, bootstrap_samples=10)
    assert math.isnan(only_desirable["undesirable_negative_rate"]) and only_desirable["sign_accuracy"] == 1.0
