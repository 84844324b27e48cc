"""tasks.reports: the Prefect artifacts' markdown shows every judge's validity, with its CI, beside its win rates."""

from __future__ import annotations

from tasks.reports import comparison_lines, comparison_markdown, judge_markdown

SUMMARY = {
    "judge": "bradley-terry(all-MiniLM-L6-v2): linear head", "judge_validity": 0.62, "judge_validity_ci_low": 0.55,
    "judge_validity_ci_high": 0.69, "judge_validated": True, "judge_validity_note": "ranks ...", "n_prompts": 32,
    "policy_wins": 18, "reference_wins": 13, "ties": 1, "win_rate": 0.578, "win_rate_ci_low": 0.41,
    "win_rate_ci_high": 0.75, "win_rate_soft": 0.52, "win_rate_soft_ci_low": 0.5, "win_rate_soft_ci_high": 0.54,
    "lc_win_rate": 0.49, "lc_win_rate_ci_low": 0.46, "lc_win_rate_ci_high": 0.52, "length_ratio": 1.3,
    "length_ratio_ci_low": 1.1, "length_ratio_ci_high": 1.5, "policy_eot_rate": 0.25, "policy_eot_rate_ci_low": 0.1,
    "policy_eot_rate_ci_high": 0.4, "confidence": 0.95,
}


def test_comparison_markdown_puts_the_judges_validity_beside_the_win_rates():
    lines = comparison_lines(SUMMARY)
    assert lines[0] == ("judge: bradley-terry(all-MiniLM-L6-v2): linear head; validity 0.620 (CI 0.550-0.690) "
                        "(validated)")
    assert lines[1].startswith("win rate 0.578 (CI 0.410-0.750) over 32 prompts (policy wins 18, reference wins 13, "
                               "ties 1)")
    assert "length-controlled 0.490 (CI 0.460-0.520)" in lines[1] and "[95% bootstrap CIs]" in lines[1]
    assert "length ratio policy/reference 1.300 (CI 1.100-1.500)" in lines[2]
    assert "end-of-turn rate policy 0.25 (CI 0.10-0.40)" in lines[2]
    md = comparison_markdown(SUMMARY)
    assert "- " + lines[0] in md
    assert "| win_rate | 0.578 | 0.41 | 0.75 |" in md and "| judge_validity | 0.62 | 0.55 | 0.69 |" in md
    assert "win_rate_ci_low |" not in md  # CI ends are columns, not rows


def test_an_unmeasured_or_failing_judge_says_so():
    unvalidated = {**SUMMARY, "judge_validity": None, "judge_validity_ci_low": None, "judge_validity_ci_high": None,
                   "judge_validated": False, "judge_validity_note": "unvalidated: the judge reads the reference"}
    assert comparison_lines(unvalidated)[0].endswith("validity not measured (unvalidated: the judge reads the reference)")
    coin = {**SUMMARY, "judge_validity": 0.53, "judge_validity_ci_low": 0.46, "judge_validated": False}
    assert "NOT validated: CI reaches 0.5" in comparison_lines(coin)[0]


def test_judge_markdown_shows_validity_and_the_cross_validation_behind_the_head():
    manifest = {
        "name": "bradley-terry(all-MiniLM-L6-v2): linear head",
        "validity": {"validity": 0.615, "validity_ci_low": 0.55, "validity_ci_high": 0.68, "validity_tie_rate": 0.0,
                     "validity_n_pairs": 199, "confidence": 0.95, "validated": True, "note": ""},
        "training": {"n_pairs": 1000, "features": "embeddings", "l2": 0.01, "folds": 5,
                     "cross_validation": {"embeddings": {"0.001": 0.55, "0.01": 0.58}, "embeddings+text": {"0.01": 0.57}}},
    }
    md = judge_markdown(manifest)
    assert "**0.615** (95% bootstrap CI 0.550-0.680, ties 0.000): validated" in md and "199 held-out pairs" in md
    assert "Trained on 1000 train pairs; features `embeddings` and L2 0.01 picked by 5-fold cross-validation" in md
    assert "| embeddings | 0.01 | 0.580 |" in md and "| embeddings+text | 0.01 | 0.570 |" in md
    unmeasured = judge_markdown({"name": "similarity", "validity": {"validity": None, "note": "unvalidated: reads"},
                                 "training": None})
    assert "Validity not measured: unvalidated: reads." in unmeasured
