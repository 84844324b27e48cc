"""dpo_core.judges: the offline embedding judge, a local reward-model judge, and make_judge."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from dpo_core.config import JudgeConfig
from dpo_core.judges import EmbeddingJudge, Judge, JudgeError, RewardModelJudge, make_judge

PROMPT = [{"role": "user", "content": "How do I boil an egg?"}]
CHOSEN = "Put the egg in boiling water for about nine minutes, then cool it in cold water before peeling."
REJECTED = "No idea. Eggs are not my thing, ask someone else."


@pytest.fixture(scope="module")
def embedding_judge() -> EmbeddingJudge:
    return EmbeddingJudge()


def test_embedding_judge_prefers_the_chosen_answer(embedding_judge):
    prompts = [PROMPT] * 3
    answers = [CHOSEN, REJECTED, "Boil it in water for nine minutes and cool it down."]
    scores = embedding_judge.score(prompts, answers, [CHOSEN] * 3, [REJECTED] * 3)
    assert scores[0] > 0 > scores[1]
    assert scores[0] == pytest.approx(-scores[1], abs=1e-5)  # cos(c,c)-cos(c,r) = -(cos(r,c)-cos(r,r))
    assert scores[0] > scores[2] > scores[1]  # a paraphrase of the chosen answer sits in between
    assert isinstance(embedding_judge, Judge)
    assert "all-MiniLM-L6-v2" in embedding_judge.name


def test_embedding_judge_edge_cases(embedding_judge):
    assert embedding_judge.score([], [], [], []) == []
    with pytest.raises(JudgeError, match="equal lengths"):
        embedding_judge.score([PROMPT], [CHOSEN, REJECTED], [CHOSEN], [REJECTED])


def test_embedding_judge_missing_folder(tmp_path):
    with pytest.raises(JudgeError, match="does not exist"):
        EmbeddingJudge(tmp_path / "nowhere")


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
