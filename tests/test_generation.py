"""dpo_core.generation: left-padded batched decoding, seeded sampling, end-of-turn stopping."""

from __future__ import annotations

import pytest
import torch

from dpo_core.generation import Generation, GenerationError, PromptRenderError, generate, stop_token_ids
from dpo_core.models import tiny_llama
from dpo_core.templating import render_prompt_ids

PROMPTS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "user", "content": "Write a long sentence about the history of the river that runs through town."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
]


def _untied_model(tokenizer, seed: int = 1) -> torch.nn.Module:
    """A tiny Llama whose LM head is a separate random matrix, so greedy decoding does not just echo its input."""
    model = tiny_llama(tokenizer, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(model.lm_head.weight.shape, generator=generator)
    model.lm_head.weight = torch.nn.Parameter(weight)
    model.config.tie_word_embeddings = False
    return model


def test_stop_tokens_include_the_chat_templates_end_of_turn(tokenizer, tiny_model):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(tokenizer, tiny_model)


def test_greedy_batched_left_padded_equals_one_by_one(tokenizer):
    model = _untied_model(tokenizer)
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert len({tuple(g.token_ids) for g in batched}) > 1  # the prompts really lead to different answers
    for g in batched:
        assert g.n_tokens == len(g.token_ids) == 6
        assert not g.stopped_at_eos
        assert g.text == tokenizer.decode(g.token_ids, skip_special_tokens=True)
    assert batched[1].prompt_tokens > batched[0].prompt_tokens


def test_sampling_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone(tokenizer, tiny_model):
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, batch_size=2)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = generate(tiny_model, tokenizer, PROMPTS, seed=7, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), before)
    again = generate(tiny_model, tokenizer, PROMPTS, seed=7, **kwargs)
    other = generate(tiny_model, tokenizer, PROMPTS, seed=8, **kwargs)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_stops_at_end_of_turn_and_reports_it(tokenizer, tiny_model):
    """A head biased towards <|im_end|> ends every answer at once: one token, stopped, empty text."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    head = torch.nn.Linear(tiny_model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.copy_(tiny_model.lm_head.weight)
        head.bias.zero_()
        head.bias[im_end] = 1e4
    tiny_model.lm_head = head
    tiny_model.config.tie_word_embeddings = False
    out = generate(tiny_model, tokenizer, PROMPTS[:2], max_new_tokens=5, batch_size=2)
    for g in out:
        assert g == Generation(text="", n_tokens=1, stopped_at_eos=True, token_ids=[im_end], prompt_ids=g.prompt_ids)
        assert g.content_ids == []


def test_generations_carry_their_prompt_ids_cut_from_the_left(tokenizer):
    model = _untied_model(tokenizer)
    rendered = [render_prompt_ids(p, tokenizer, None) for p in PROMPTS]
    full = generate(model, tokenizer, PROMPTS, max_new_tokens=2, batch_size=3)
    assert [g.prompt_ids for g in full] == rendered  # no padding in them, though the batch was left-padded
    cut = generate(model, tokenizer, PROMPTS[1:2], max_new_tokens=2, max_prompt_length=10)[0]
    assert cut.prompt_ids == rendered[1][-10:] and cut.prompt_tokens == 10 < full[1].prompt_tokens


def test_peft_wrapped_model_generates_like_its_base(tokenizer):
    """Fresh LoRA adapters start as a no-op (B = 0): the wrapped model must decode exactly like the base one."""
    from dpo_core.config import LoraConfig, ModelConfig
    from dpo_core.models import attach_lora

    base = _untied_model(tokenizer)
    expected = [g.token_ids for g in generate(base, tokenizer, PROMPTS, max_new_tokens=4, batch_size=3)]
    wrapped = attach_lora(base, ModelConfig(lora=LoraConfig(r=4, alpha=8)))
    assert [g.token_ids for g in generate(wrapped, tokenizer, PROMPTS, max_new_tokens=4, batch_size=3)] == expected


def test_num_threads_holds_only_while_decoding_and_changes_no_answer(tokenizer):
    model = _untied_model(tokenizer)
    seen = []
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        default = generate(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=3)
        assert set(seen) == {2}
        seen.clear()
        one = generate(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=3, num_threads=1)
        assert set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert [g.token_ids for g in one] == [g.token_ids for g in default]
    with pytest.raises(GenerationError, match="num_threads"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=4, num_threads=0)


def test_model_left_in_its_training_mode(tokenizer, tiny_model):
    tiny_model.train()
    generate(tiny_model, tokenizer, PROMPTS[:1], max_new_tokens=1)
    assert tiny_model.training


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4, temperature=0.0, do_sample=True), "temperature"),
        (dict(max_new_tokens=4, top_p=1.5), "top_p"),
        (dict(max_new_tokens=4, batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments_give_a_clear_error(tokenizer, tiny_model, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        generate(tiny_model, tokenizer, PROMPTS, **kwargs)


def test_a_prompt_not_ending_with_a_user_turn_is_refused_by_position(tokenizer, tiny_model):
    prompts = [PROMPTS[0], [{"role": "assistant", "content": "x"}]]
    with pytest.raises(PromptRenderError, match="prompt 1 cannot be rendered: .*end with a user message") as err:
        generate(tiny_model, tokenizer, prompts, max_new_tokens=2)
    assert err.value.index == 1


def test_no_prompts_no_generations(tokenizer, tiny_model):
    assert generate(tiny_model, tokenizer, [], max_new_tokens=2) == []


@pytest.mark.slow
def test_embedded_model_answers_and_stops_at_im_end(smollm2_dir, tokenizer):
    from dpo_core.config import ModelConfig
    from dpo_core.models import load_model

    model = load_model(smollm2_dir, ModelConfig(device="cpu"))
    prompts = [[{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]]
    (g,) = generate(model, tokenizer, prompts, max_new_tokens=40)
    assert g.stopped_at_eos and g.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "Paris" in g.text
