"""dpo_core.judges: the trained Bradley-Terry judge, the similarity judge, a local reward-model judge, judge_validity
and make_judge."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from pydantic import ValidationError

from dpo_core.config import JudgeConfig
from dpo_core.judges import (
    BradleyTerryJudge,
    Judge,
    JudgeError,
    RewardModelJudge,
    SentenceEncoder,
    SimilarityJudge,
    fit_bradley_terry,
    judge_validity,
    make_judge,
    text_statistics,
    train_bradley_terry,
)

PROMPT = [{"role": "user", "content": "How do I boil an egg?"}]
CHOSEN = "Put the egg in boiling water for about nine minutes, then cool it in cold water before peeling."
REJECTED = "No idea. Eggs are not my thing, ask someone else."


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder(max_tokens=JudgeConfig().max_tokens)  # the encoder the judge stage builds by default


@pytest.fixture(scope="module")
def similarity_judge(encoder) -> SimilarityJudge:
    return SimilarityJudge(encoder=encoder)


def test_similarity_judge_prefers_the_chosen_answer(similarity_judge):
    prompts = [PROMPT] * 3
    answers = [CHOSEN, REJECTED, "Boil it in water for nine minutes and cool it down."]
    scores = similarity_judge.score(prompts, answers, [CHOSEN] * 3, [REJECTED] * 3)
    assert scores[0] > 0 > scores[1]
    assert scores[0] == pytest.approx(-scores[1], abs=1e-5)  # cos(c,c)-cos(c,r) = -(cos(r,c)-cos(r,r))
    assert scores[0] > scores[2] > scores[1]  # a paraphrase of the chosen answer sits in between
    assert isinstance(similarity_judge, Judge)
    assert "all-MiniLM-L6-v2" in similarity_judge.name and "unvalidated" in similarity_judge.name


def test_similarity_judge_edge_cases(similarity_judge):
    assert similarity_judge.score([], [], [], []) == []
    with pytest.raises(JudgeError, match="equal lengths"):
        similarity_judge.score([PROMPT], [CHOSEN, REJECTED], [CHOSEN], [REJECTED])


def test_similarity_judge_missing_folder(tmp_path):
    with pytest.raises(JudgeError, match="does not exist"):
        SimilarityJudge(tmp_path / "nowhere")


def test_similarity_judge_is_reported_unvalidated(similarity_judge):
    """It reads the reference answers, so ranking them is trivially right: no validity is claimed for it."""
    v = judge_validity(similarity_judge, [PROMPT] * 2, [CHOSEN] * 2, [REJECTED] * 2)
    assert v["validity"] is None and v["validity_ci_low"] is None and v["validated"] is False
    assert "unvalidated" in v["note"] and v["judge"] == similarity_judge.name


# A synthetic preference task with a known answer: the chosen answer carries a marker sentence somewhere, otherwise
# both answers are drawn from the same templates about the prompt's topic.
TOPICS = ["bread", "rivers", "guitars", "tax forms", "volcanoes", "chess", "bicycles", "tea", "python lists", "tides",
          "owls", "mortgages", "glaciers", "violins", "compost", "satellites", "sourdough", "marathons", "spreadsheets",
          "bees"]
VERBS = ["depends on", "changes with", "is shaped by", "comes down to", "varies with"]
THINGS = ["the season", "practice", "the weather", "your budget", "local rules", "the tools you have", "patience",
          "timing"]
MARKER = "Verified answer"


def marker_pairs(n: int, seed: int) -> tuple[list, list[str], list[str], list[str]]:
    rng = random.Random(seed)

    def answer(topic: str) -> list[str]:
        return [f"{topic.capitalize()} {rng.choice(VERBS)} {rng.choice(THINGS)}" for _ in range(rng.randint(2, 4))]

    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        sentences = answer(topic)
        sentences.insert(rng.randrange(len(sentences) + 1), MARKER)
        prompts.append([{"role": "user", "content": f"Tell me about {topic}."}])
        chosen.append(". ".join(sentences) + ".")
        rejected.append(". ".join(answer(topic)) + ".")
    return prompts, chosen, rejected, [f"synthetic-{seed}-{i}" for i in range(n)]


@pytest.fixture(scope="module")
def marker_judge(encoder) -> BradleyTerryJudge:
    prompts, chosen, rejected, ids = marker_pairs(120, seed=0)
    return train_bradley_terry(encoder, prompts, chosen, rejected, ids, l2_grid=[1e-3, 1e-2, 1e-1], folds=5)


def test_bradley_terry_judge_learns_a_known_preference(marker_judge):
    """Trained on 120 synthetic pairs, it finds the marker on 60 new ones: validity >= 0.95, CI clear of chance."""
    prompts, chosen, rejected, _ = marker_pairs(60, seed=1)
    v = judge_validity(marker_judge, prompts, chosen, rejected, n_samples=2000, seed=0)
    assert v["validity"] >= 0.95, v
    assert v["validated"] and 0.5 < v["validity_ci_low"] <= v["validity"] <= v["validity_ci_high"] <= 1.0
    assert v["validity_n_pairs"] == 60 and v["validity_tie_rate"] == 0.0
    info = marker_judge.info
    assert info["n_pairs"] == 120 and info["folds"] == 5
    cv = info["cross_validation"]
    assert set(cv) == {"embeddings", "embeddings+text"} and all(set(v) == {"0.001", "0.01", "0.1"} for v in cv.values())
    # the pick is the best cross-validated accuracy (simpler features, then larger L2, on a tie)
    best = max(((f, float(l2)) for f in cv for l2 in cv[f]),
               key=lambda c: (cv[c[0]][repr(c[1])], c[0] == "embeddings", c[1]))
    assert (info["features"], info["l2"]) == best and marker_judge.features == info["features"]
    assert marker_judge.uses_references is False and isinstance(marker_judge, Judge)


def test_bradley_terry_judge_ignores_the_reference_answers_and_survives_a_save(marker_judge, encoder, tmp_path):
    prompts, chosen, rejected, _ = marker_pairs(4, seed=2)
    scores = marker_judge.score(prompts, chosen, chosen, rejected)
    assert scores == marker_judge.score(prompts, chosen, rejected, chosen)  # chosen / rejected are not read
    marker_judge.save(tmp_path)
    loaded = make_judge(JudgeConfig(kind="bradley_terry"), trained=tmp_path)
    assert isinstance(loaded, BradleyTerryJudge) and loaded.info == marker_judge.info
    assert loaded.name == marker_judge.name
    assert loaded.score(prompts, chosen, chosen, rejected) == pytest.approx(scores, abs=1e-5)


def test_the_encoder_cuts_texts_at_max_tokens_and_a_saved_judge_keeps_its_cut(marker_judge, tmp_path):
    short = SentenceEncoder(max_tokens=8)
    words = "boil the egg for nine minutes then cool it in cold water and peel it slowly under the tap"
    longer = words + " and serve it with salt, pepper and a slice of toast"
    assert short.max_tokens == 8
    assert torch.equal(short.embed([words])[0], short.embed([longer])[0])  # everything after word piece 8 is cut
    full = SentenceEncoder(max_tokens=None)
    assert full.max_tokens == 256 and not torch.equal(full.embed([words])[0], full.embed([longer])[0])
    marker_judge.save(tmp_path)
    with pytest.raises(JudgeError, match="cut to 128 word pieces; this encoder cuts them to 256"):
        make_judge(JudgeConfig(kind="bradley_terry", max_tokens=None), trained=tmp_path)
    with pytest.raises(JudgeError, match="max_tokens must be a positive int"):
        SentenceEncoder(max_tokens=0)


def test_bradley_terry_text_features_are_standardised_and_saved(encoder, tmp_path):
    """The `embeddings+text` feature set: 12 text statistics standardised by the training answers' mean and sd, kept
    with the head so a reloaded judge scores the same."""
    prompts, chosen, rejected, ids = marker_pairs(30, seed=3)
    judge = train_bradley_terry(encoder, prompts, chosen, rejected, ids, l2_grid=[0.01],
                                feature_sets=["embeddings+text"], folds=3)
    assert judge.features == "embeddings+text" and "text statistics" in judge.name
    assert judge.weight.shape == (2 * encoder.dim + len(text_statistics("", "")),)
    stats = torch.tensor([text_statistics(p[0]["content"], a) for p, a in zip(prompts * 2, chosen + rejected)])
    mean, scale = judge.text_scaling
    assert torch.allclose(mean, stats.mean(0)) and torch.allclose(scale, stats.std(0).clamp_min(1e-6))
    judge.save(tmp_path)
    loaded = make_judge(JudgeConfig(kind="bradley_terry"), trained=tmp_path)
    assert loaded.features == "embeddings+text"
    assert loaded.score(prompts[:3], chosen[:3], chosen[:3], rejected[:3]) == pytest.approx(
        judge.score(prompts[:3], chosen[:3], chosen[:3], rejected[:3]), abs=1e-5)


def test_text_statistics_by_hand():
    stats = text_statistics("How do I boil eggs?", "1. Boil water.\n2. Add eggs?\n```\nwait()\n```")
    assert len(stats) == 12
    assert stats[2] == pytest.approx(math.log1p(5))  # five lines
    assert stats[3] == pytest.approx(2 / 5)  # two numbered list lines
    assert stats[5] == 0.0 and text_statistics("", "As an AI language model, I cannot.")[5] == 1.0
    assert stats[10] == 1.0  # a code fence


def test_fit_bradley_terry_is_the_regularised_optimum():
    """The gradient of the BT loss + L2 vanishes at the fitted weight; the fit is deterministic."""
    gen = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(50, 6, generator=gen), torch.randn(50, 6, generator=gen)
    chosen[:, 0] += 1.0  # a feature that tends to be larger in the chosen answer
    w = fit_bradley_terry(chosen, rejected, l2=0.05)
    assert torch.equal(w, fit_bradley_terry(chosen, rejected, l2=0.05))
    assert w[0] > 0
    wd = w.double().requires_grad_(True)
    diff = (chosen - rejected).double()
    loss = torch.nn.functional.softplus(-(diff @ wd)).mean() + 0.025 * wd.dot(wd)
    (grad,) = torch.autograd.grad(loss, wd)
    assert grad.abs().max() < 1e-5


def test_bradley_terry_errors(encoder, tmp_path):
    with pytest.raises(JudgeError, match="at least 2 cross-validation folds"):
        train_bradley_terry(encoder, [PROMPT], [CHOSEN], [REJECTED], ["only"], l2_grid=[0.1])
    with pytest.raises(JudgeError, match="feature sets must be among"):
        train_bradley_terry(encoder, [PROMPT], [CHOSEN], [REJECTED], ["only"], l2_grid=[0.1], feature_sets=["words"])
    with pytest.raises(JudgeError, match="at least one L2"):
        train_bradley_terry(encoder, [PROMPT], [CHOSEN], [REJECTED], ["only"], l2_grid=[])
    with pytest.raises(JudgeError, match="trained by the judge stage"):
        make_judge(JudgeConfig(kind="bradley_terry"))
    with pytest.raises(JudgeError, match="head.safetensors, judge.json missing"):
        make_judge(JudgeConfig(kind="bradley_terry"), trained=tmp_path)
    with pytest.raises(JudgeError, match="needs"):
        BradleyTerryJudge(encoder, torch.zeros(5))


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    """A tiny randomly initialised LlamaForSequenceClassification (one logit) with the SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-rm")
    LlamaForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def test_reward_model_judge_scores_the_last_token_of_the_rendered_conversation(reward_model_dir, tokenizer):
    judge = make_judge(JudgeConfig(kind="reward_model", path=str(reward_model_dir)))
    assert isinstance(judge, RewardModelJudge) and reward_model_dir.name in judge.name
    scores = judge.score([PROMPT, PROMPT], [CHOSEN, REJECTED], [CHOSEN] * 2, [REJECTED] * 2)

    # a reward model is measured like every judge: its accuracy on the pairs, by its own scores
    v = judge_validity(judge, [PROMPT], [CHOSEN], [REJECTED])
    assert v["validity"] == float(scores[0] > scores[1]) and v["validity_n_pairs"] == 1
    assert len(scores) == 2 and scores[0] != scores[1]
    assert scores == judge.score([PROMPT, PROMPT], [CHOSEN, REJECTED], [REJECTED] * 2, [CHOSEN] * 2)  # refs unused

    # by hand: the conversation ends with <|im_end|>\n; SmolLM2's pad id is <|im_end|> too, yet the true last
    # token is what gets pooled (the judge disables pad-based pooling for its unpadded sequences)
    text = tokenizer.apply_chat_template([*PROMPT, {"role": "assistant", "content": CHOSEN}], tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden = judge.model.model(input_ids=ids).last_hidden_state
        expected = judge.model.score(hidden[0, -1]).item()
    assert scores[0] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_reward_model_judge_keeps_the_answer_when_cutting(reward_model_dir):
    judge = RewardModelJudge(reward_model_dir, max_length=8)
    assert len(judge._render(PROMPT, CHOSEN)) == 8
    long_prompt = [{"role": "user", "content": "word " * 500}]
    assert judge.score([long_prompt], [CHOSEN], [CHOSEN], [REJECTED]) == judge.score(
        [PROMPT], [CHOSEN], [CHOSEN], [REJECTED]
    )


def test_reward_model_judge_refuses_a_multi_label_classifier(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=2)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(JudgeError, match="num_labels=2"):
        RewardModelJudge(tmp_path)


def test_reward_model_judge_reports_weights_that_do_not_fit(reward_model_dir, tmp_path):
    """A config edited to a different hidden size: transformers raises RuntimeError; the judge says what failed."""
    for f in reward_model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(JudgeError, match="could not load a reward model"):
        RewardModelJudge(tmp_path)


def test_make_judge_errors(tmp_path):
    with pytest.raises(ValidationError, match="eval.judge.path is not set"):
        JudgeConfig(kind="reward_model")
    with pytest.raises(JudgeError, match="no config.json"):
        make_judge(JudgeConfig(kind="reward_model", path=str(tmp_path)))
