"""dpo_core.scoring.score_pairs (the one forward-only scorer) and dpo_core.models.pad_id (the one pad-id rule)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dpo_core.batching import collate_pairs
from dpo_core.logprobs import sequence_logps
from dpo_core.models import DeviceSpec, ModelLoadError, pad_id, tiny_llama
from dpo_core.scoring import PairScores, ScoringError, score_pairs

CPU = DeviceSpec(torch.device("cpu"), torch.float32, None, "eager")


def _rows(n: int = 7) -> list[dict]:
    """Pairs of different lengths, in an order that is not sorted by length."""
    return [{"pair_id": f"p{i}", "prompt_ids": list(range(10, 13 + (i * 5) % 7)),
             "chosen_ids": list(range(100, 102 + (i * 3) % 5)), "rejected_ids": list(range(200, 201 + i % 3))}
            for i in range(n)]


def _one_by_one(model: torch.nn.Module, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logps = [sequence_logps(model.eval(), collate_pairs([row], 0))[0].double().numpy() for row in rows]
    return np.array([x[0] for x in logps]), np.array([x[1] for x in logps])


@pytest.mark.parametrize("layout", ["auto", "padded", "packed", "shared_prompt"])
def test_scores_equal_one_pair_at_a_time_in_input_order(tiny_model, layout):
    rows = _rows()
    calls = []
    tiny_model.train()
    scores = score_pairs(tiny_model, rows, batch_size=3, spec=CPU, chunk_size=4, layout=layout,
                         progress=lambda done, total: calls.append((done, total)))
    assert tiny_model.training, "the model's train/eval mode is restored"
    chosen, rejected = _one_by_one(tiny_model, rows)
    np.testing.assert_allclose(scores.chosen_logps, chosen, atol=1e-5)
    np.testing.assert_allclose(scores.rejected_logps, rejected, atol=1e-5)
    assert scores.chosen_tokens.tolist() == [len(r["chosen_ids"]) for r in rows]
    assert scores.rejected_tokens.tolist() == [len(r["rejected_ids"]) for r in rows]
    assert (scores.chosen_logps.dtype, scores.chosen_tokens.dtype) == (np.float64, np.int64)
    assert calls == [(3, 7), (6, 7), (7, 7)]


@pytest.mark.parametrize("layout", ["padded", "shared_prompt"])
def test_the_pad_id_does_not_change_a_bit(tokenizer, layout):
    """Padded positions are masked and never scored: padding with another id gives the same scores bit for bit."""
    model = tiny_llama(tokenizer, seed=3)
    rows = _rows(9)
    before = score_pairs(model, rows, batch_size=4, layout=layout)
    model.config.pad_token_id = 7
    after = score_pairs(model, rows, batch_size=4, layout=layout)
    assert np.array_equal(after.chosen_logps, before.chosen_logps)
    assert np.array_equal(after.rejected_logps, before.rejected_logps)


def test_no_rows_and_bad_batch_size(tiny_model):
    empty = score_pairs(tiny_model, [], batch_size=2)
    assert isinstance(empty, PairScores) and empty.chosen_logps.shape == (0,) and empty.rejected_tokens.shape == (0,)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ScoringError, match="batch_size"):
            score_pairs(tiny_model, _rows(), batch_size=bad)


def test_pad_id_rule():
    assert pad_id(SimpleNamespace(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_id(SimpleNamespace(pad_token_id=-1, eos_token_id=[9, 4])) == 9  # an invalid pad id is skipped
    assert pad_id(SimpleNamespace(eos_token_id=3)) == 3
    with pytest.raises(ModelLoadError, match="neither a pad nor an eos token id"):
        pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_pad_id_of_the_real_tokenizer_and_a_model_config(tokenizer, tiny_model):
    assert pad_id(tokenizer) == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert pad_id(tiny_model.config) == tokenizer.pad_token_id


def test_bfloat16_autocast_on_cpu_scores_close_to_float32(tiny_model):
    """`model.dtype: bfloat16` on CPU: the scorer's forward runs under bf16 autocast (float32 weights), sums in
    float64; the scores stay within bf16 rounding of the float32 ones and differ from them (autocast really ran)."""
    from dpo_core.config import ModelConfig
    from dpo_core.models import pick_device

    bf16 = pick_device(ModelConfig(device="cpu", dtype="bfloat16", num_threads=None))
    rows = _rows()
    exact = score_pairs(tiny_model, rows, batch_size=3, spec=CPU)
    low = score_pairs(tiny_model, rows, batch_size=3, spec=bf16)
    assert low.chosen_logps.dtype == np.float64 and next(tiny_model.parameters()).dtype == torch.float32
    np.testing.assert_allclose(low.chosen_logps, exact.chosen_logps, rtol=2e-2, atol=5e-2)
    np.testing.assert_allclose(low.rejected_logps, exact.rejected_logps, rtol=2e-2, atol=5e-2)
    assert not np.array_equal(low.chosen_logps, exact.chosen_logps)
