"""Batching: one concatenated right-padded batch (chosen rows first), and seeded length-grouped batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpo_core.batching import (BatchingError, collate_pairs, length_grouped_batches, make_batch, pack_pairs, pair_length,
                               resolve_layout, share_prompt_pairs)

PAD = 0


def _rows():
    return [
        {"pair_id": "a", "prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
        # numpy arrays, as read back from Parquet
        {"pair_id": "b", "prompt_ids": np.array([11], dtype=np.int32), "chosen_ids": np.array([12, 13, 14, 15]),
         "rejected_ids": np.array([16, 17])},
    ]


def test_collate_concatenates_chosen_then_rejected_right_padded():
    batch = collate_pairs(_rows(), pad_id=PAD)
    assert batch.n_pairs == 2 and batch.pair_ids == ["a", "b"]
    assert batch.input_ids.shape == (4, 5) and batch.input_ids.dtype == torch.long
    expected = torch.tensor(
        [
            [5, 6, 7, 8, 9],  # a chosen
            [11, 12, 13, 14, 15],  # b chosen
            [5, 6, 7, 10, PAD],  # a rejected
            [11, 16, 17, PAD, PAD],  # b rejected
        ]
    )
    assert torch.equal(batch.input_ids, expected)
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch.response_mask.dtype == torch.bool
    assert batch.response_mask.int().tolist() == [
        [0, 0, 0, 1, 1],
        [0, 1, 1, 1, 1],
        [0, 0, 0, 1, 0],
        [0, 1, 1, 0, 0],
    ]
    assert batch.n_tokens == 5 + 5 + 4 + 3
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.pair_ids == batch.pair_ids


def test_pack_pairs_puts_every_sequence_in_one_row():
    batch = pack_pairs(_rows())
    assert batch.is_packed and batch.n_pairs == 2 and batch.n_sequences == 4
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 5, 6, 7, 10, 11, 16, 17]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    assert batch.sequence_ids.tolist() == [[0] * 5 + [1] * 5 + [2] * 4 + [3] * 3]
    assert batch.response_mask.int().tolist() == [[0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 1, 1]]
    assert batch.n_tokens == 17 and batch.attention_mask.min() == 1
    assert batch.to("cpu").position_ids.tolist() == batch.position_ids.tolist()
    assert not collate_pairs(_rows(), PAD).is_packed and collate_pairs(_rows(), PAD).n_sequences == 4


def test_share_prompt_pairs_puts_each_pair_in_one_row_with_a_mask_that_hides_chosen_from_rejected():
    batch = share_prompt_pairs(_rows(), pad_id=PAD)
    assert batch.layout == "shared_prompt" and batch.n_pairs == 2 and batch.n_sequences == 4
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, PAD], [11, 12, 13, 14, 15, 16, 17]]
    # the rejected response restarts where the prompt ends
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0], [0, 1, 2, 3, 4, 1, 2]]
    assert batch.sequence_ids.tolist() == [[-1, -1, -1, 0, 0, 2, -1], [-1, 1, 1, 1, 1, 3, 3]]
    # the first rejected token is predicted from the last prompt position
    assert batch.predictor_ids.tolist() == [[-1, -1, -1, 2, 3, 2, -1], [-1, 0, 1, 2, 3, 0, 5]]
    assert batch.response_mask.int().tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]]
    mask = batch.attention_4d[0, 0].int().tolist()
    assert mask[5] == [1, 1, 1, 0, 0, 1, 0]  # pair a's rejected token: the prompt and itself, not the chosen
    assert mask[4] == [1, 1, 1, 1, 1, 0, 0]  # chosen: causal
    assert mask[6] == [0, 0, 0, 0, 0, 0, 1]  # padding attends to itself only (no all-masked row)
    assert batch.attention_4d[1, 0, 6].int().tolist() == [1, 0, 0, 0, 0, 1, 1]  # b: prompt [11], rejected 16, 17
    assert batch.n_tokens == 6 + 7  # positions computed: each prompt once
    assert batch.n_sequence_tokens == collate_pairs(_rows(), PAD).n_tokens == 17  # tokens trained: as two rows
    moved = batch.to("cpu")
    assert moved.layout == "shared_prompt" and torch.equal(moved.attention_4d, batch.attention_4d)


def test_layouts_resolve_by_attention_kernel_and_refuse_what_cannot_work():
    assert resolve_layout("auto", "sdpa") == resolve_layout("auto", "eager") == "shared_prompt"
    assert resolve_layout("auto", "flash_attention_2") == "padded"
    assert resolve_layout("packed", "flash_attention_2") == "packed"
    with pytest.raises(BatchingError, match="4-D mask"):
        resolve_layout("shared_prompt", "flash_attention_2")
    with pytest.raises(BatchingError, match="unknown batch layout"):
        resolve_layout("zigzag", "sdpa")
    with pytest.raises(BatchingError, match="resolve 'auto' first"):
        make_batch(_rows(), PAD, "auto")
    assert [make_batch(_rows(), PAD, k).layout for k in ("padded", "packed", "shared_prompt")] == [
        "padded", "packed", "shared_prompt"]


def test_pair_length_is_the_longer_row():
    assert [pair_length(r) for r in _rows()] == [5, 5]


@pytest.mark.parametrize(
    "rows, match",
    [
        ([], "empty list"),
        ([{"pair_id": "x", "prompt_ids": [1], "chosen_ids": [], "rejected_ids": [2]}], "empty chosen_ids"),
        ([{"pair_id": "x", "prompt_ids": [], "chosen_ids": [1], "rejected_ids": [2]}], "empty prompt_ids"),
        ([{"pair_id": "x", "prompt_ids": [1], "chosen_ids": [1]}], "no 'rejected_ids'"),
    ],
)
def test_collate_rejects_bad_rows_with_a_clear_error(rows, match):
    with pytest.raises(BatchingError, match=match):
        collate_pairs(rows, pad_id=PAD)


def test_length_grouped_batches_cover_every_index_once_and_are_seeded():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=103).tolist()
    batches = length_grouped_batches(lengths, 4, seed=7, mega_batch_mult=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(103))
    assert [len(b) for b in batches[:-1]] == [4] * (len(batches) - 1) and len(batches[-1]) == 103 % 4
    assert batches == length_grouped_batches(lengths, 4, seed=7, mega_batch_mult=4)
    assert batches != length_grouped_batches(lengths, 4, seed=8, mega_batch_mult=4)
    # inside each mega-batch of 16 indices, lengths are sorted longest first
    for start in range(0, 103, 16):
        mega = flat[start : start + 16]
        assert [lengths[i] for i in mega] == sorted((lengths[i] for i in mega), reverse=True)


def test_length_grouping_cuts_padding():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 300, size=256).tolist()

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = length_grouped_batches(lengths, 4, seed=0, mega_batch_mult=8)
    ungrouped = length_grouped_batches(lengths, 4, seed=0, mega_batch_mult=1)
    assert padding(grouped) < 0.5 * padding(ungrouped)


def test_length_grouped_batches_without_shuffle_and_bad_args():
    assert length_grouped_batches([1, 3, 2, 4], 2, seed=0, mega_batch_mult=1, shuffle=False) == [[1, 0], [3, 2]]
    assert length_grouped_batches([], 2, seed=0) == []
    with pytest.raises(BatchingError, match="batch_size"):
        length_grouped_batches([1, 2], 0, seed=0)
