"""Chat templating: response ids are exactly the assistant turn (end-of-turn included), prefix property, truncation."""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from dpo_core.templating import (
    ChatRenderer,
    TemplateError,
    render_prompt_ids,
    score_response_ids,
    tokenize_pairs,
)

# Qwen2.5-Instruct's template (its no-tools branch): a default system prompt when the conversation has none.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>'"
    " + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Zephyr-style: no default system prompt, end of turn = eos token.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def _pairs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "pair_id": ["a", "b", "c"],
            "split": ["train", "train", "eval"],
            "prompt": [
                [{"role": "user", "content": "What is 2 + 2?"}],
                [{"role": "system", "content": "Answer in French."},
                 {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Bonjour !"},
                 {"role": "user", "content": "How are you?"}],
                [{"role": "user", "content": "Write a haiku."}],
            ],
            "chosen": ["4", "Très bien, merci.", "\n\nAutumn moonlight—\na worm digs silently"],
            "rejected": ["It is 5, obviously.", "Fine.", "no"],
        }
    )


@pytest.mark.parametrize("template, end_of_turn", [(None, "<|im_end|>\n"), (QWEN25_TEMPLATE, "<|im_end|>\n"),
                                                    (ZEPHYR_TEMPLATE, "<|im_end|>\n")],
                         ids=["smollm2", "qwen2.5", "zephyr"])
def test_response_ids_decode_to_the_response_plus_end_of_turn(tokenizer, template, end_of_turn):
    tok = _with_template(tokenizer, template) if template else tokenizer  # SmolLM2's eos is <|im_end|>
    pairs = _pairs()
    out, report = tokenize_pairs(pairs, tok, max_length=256, max_prompt_length=128)
    assert report.tokenized == 3 and report.rejected == [] and out["split"].tolist() == ["train", "train", "eval"]
    assert not out[["prompt_truncated", "chosen_truncated", "rejected_truncated"]].any().any()
    for row, pair in zip(out.itertuples(), pairs.itertuples()):
        prompt_text = tok.apply_chat_template(list(pair.prompt), tokenize=False, add_generation_prompt=True)
        assert tok.decode(row.prompt_ids) == prompt_text
        for ids, text in ((row.chosen_ids, pair.chosen), (row.rejected_ids, pair.rejected)):
            assert tok.decode(ids) == text + end_of_turn
            full = tok.apply_chat_template([*pair.prompt, {"role": "assistant", "content": text}], tokenize=False)
            assert full == prompt_text + text + end_of_turn  # the prefix property, in text
    # tokens: where the tokenizer does not merge across the boundary, prompt + response == the full conversation
    assert report.prefix_fallback == 1  # pair c's response starts with "\n\n", which BPE merges with the header's "\n"
    row = out.iloc[0]
    full_ids = tok(tok.apply_chat_template([*pairs.prompt[0], {"role": "assistant", "content": "4"}], tokenize=False),
                   add_special_tokens=False)["input_ids"]
    assert list(row.prompt_ids) + list(row.chosen_ids) == full_ids


def test_system_prompt_policy(tokenizer):
    qwen, zephyr = _with_template(tokenizer, QWEN25_TEMPLATE), _with_template(tokenizer, ZEPHYR_TEMPLATE)
    msgs = [{"role": "user", "content": "Hi"}]
    decode = lambda tok, sp: tok.decode(render_prompt_ids(msgs, tok, sp))  # noqa: E731
    assert "You are Qwen" in decode(qwen, None)  # template default kept
    assert decode(qwen, "Be terse.").startswith("<|im_start|>system\nBe terse.<|im_end|>\n")
    assert decode(qwen, "").startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user")  # suppressed: empty block
    assert "You are Qwen" not in decode(qwen, "")
    assert ChatRenderer(qwen).injects_default_system and not ChatRenderer(zephyr).injects_default_system
    assert decode(zephyr, "").startswith("<|user|>")  # no default to suppress: no system message at all
    with_system = [{"role": "system", "content": "Own system."}, *msgs]
    assert "Own system." in tokenizer.decode(render_prompt_ids(with_system, tokenizer, None))
    assert "Own system." not in tokenizer.decode(render_prompt_ids(with_system, tokenizer, ""))


def test_truncation_cuts_prompt_left_and_responses_right(tokenizer):
    pairs = pd.DataFrame({"pair_id": ["long"], "prompt": [[{"role": "user", "content": "word " * 100}]],
                          "chosen": ["yes " * 50], "rejected": ["no"]})
    full, _ = tokenize_pairs(pairs, tokenizer, max_length=1024, max_prompt_length=1000)
    out, report = tokenize_pairs(pairs, tokenizer, max_length=48, max_prompt_length=32)
    row, whole = out.iloc[0], full.iloc[0]
    assert row.prompt_truncated and row.chosen_truncated and not row.rejected_truncated
    assert (report.prompt_truncated, report.chosen_truncated, report.rejected_truncated) == (1, 1, 0)
    assert list(row.prompt_ids) == list(whole.prompt_ids)[-32:]  # the beginning is dropped
    assert tokenizer.decode(row.prompt_ids).endswith("<|im_start|>assistant\n")  # header kept
    assert list(row.chosen_ids) == list(whole.chosen_ids)[:16]  # cut from the right to max_length - prompt
    assert "<|im_end|>" not in tokenizer.decode(row.chosen_ids)
    assert list(row.rejected_ids) == list(whole.rejected_ids)


def test_no_room_and_bad_pairs_are_reported_not_dropped(tokenizer):
    pairs = pd.DataFrame({
        "pair_id": ["ok", "no-room", "ends-with-assistant", "bad-role", "not-text"],
        "prompt": [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "word " * 80}],
                   [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                   [{"role": "tool", "content": "x"}], [{"role": "user", "content": "Hi"}]],
        "chosen": ["a", "b", "c", "d", None],
        "rejected": ["e", "f", "g", "h", "i"],
    })
    out, report = tokenize_pairs(pairs, tokenizer, max_length=64, max_prompt_length=64)
    assert out["pair_id"].tolist() == ["ok"]
    reasons = {r["pair_id"]: r["reason"] for r in report.rejected}
    assert report.pairs == report.tokenized + len(report.rejected) == 5
    assert report.no_room == 1 and reasons["no-room"].startswith("no_room")
    assert "must end with a user message" in reasons["ends-with-assistant"]
    assert "role 'tool'" in reasons["bad-role"]
    assert reasons["not-text"] == "chosen is missing (null)"


def test_unusable_inputs_are_clear_errors(tokenizer):
    with pytest.raises(TemplateError, match="missing column"):
        tokenize_pairs(_pairs().drop(columns=["chosen"]), tokenizer, 64, 32)
    with pytest.raises(TemplateError, match="no chat template"):
        tokenize_pairs(_pairs(), _with_template(tokenizer, None), 64, 32)
    with pytest.raises(TemplateError, match="max_prompt_length=3 is too small"):
        tokenize_pairs(_pairs(), tokenizer, 64, 3)
    with pytest.raises(TemplateError, match="max_length=5 is too small"):
        tokenize_pairs(_pairs(), tokenizer, 5, 5)


def test_score_response_ids_match_training_tokenization(tokenizer):
    pairs = _pairs()
    out, _ = tokenize_pairs(pairs, tokenizer, max_length=256, max_prompt_length=128)
    for row, pair in zip(out.itertuples(), pairs.itertuples()):
        prompt_ids, response_ids = score_response_ids(list(pair.prompt), pair.chosen, tokenizer, None)
        assert prompt_ids == list(row.prompt_ids) and response_ids == list(row.chosen_ids)
