"""Batching preference pairs: one right-padded tensor holding every chosen row then every rejected row.

The chosen and rejected sequences of a batch go through the model in **one** concatenated forward (rows
``0..B-1`` are ``prompt + chosen``, rows ``B..2B-1`` are ``prompt + rejected``), right padded so that every real
token keeps its natural position ids ``0..n-1``. ``response_mask[r, t]`` is True exactly where the token at
position ``t`` of row ``r`` is a response token; log-probs are scored from that mask, never by counting from the end
of a sequence.

``pack_pairs`` is the padding-free alternative: all 2B sequences concatenated into ONE row, ``position_ids``
restarting at 0 for every sequence and no attention mask, so that transformers builds a block-diagonal causal mask
(flash_attention_2 runs it as variable-length sequences; sdpa/eager get an explicit mask). ``sequence_ids`` says
which of the 2B sequences (chosen 0..B-1, rejected B..2B-1) each token belongs to.

``length_grouped_batches`` cuts padding the way Hugging Face's ``LengthGroupedSampler`` does: shuffle the indices
(seeded), split them into mega-batches of ``batch_size * mega_batch_mult``, sort each mega-batch by length
(longest first) and cut it into batches. The order is a pure function of ``(lengths, batch_size, seed,
mega_batch_mult)``, which is what makes a resumed run see exactly the data of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BatchingError", "PairBatch", "collate_pairs", "pack_pairs", "length_grouped_batches", "pair_length"]


class BatchingError(ValueError):
    """Rows that cannot be batched (empty prompt or response, missing field, bad arguments)."""


@dataclass
class PairBatch:
    """A batch of B preference pairs as 2B right-padded rows (chosen rows first, then rejected rows).

    Attributes:
        input_ids: Long[2B, T] token ids, padded on the right with ``pad_id``.
        attention_mask: Long[2B, T] 1 on real tokens, 0 on padding.
        response_mask: Bool[2B, T] True where the token at position t is a response token.
        pair_ids: the B pair ids, in row order.
        position_ids: packed batches only (``pack_pairs``): Long[1, N], restarting at 0 for every sequence.
        sequence_ids: packed batches only: Long[1, N], the sequence (0..2B-1) each token belongs to.

    A packed batch has the same fields with one row of N tokens (``attention_mask`` all ones: nothing is padding).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    pair_ids: list[str]
    position_ids: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None

    @property
    def is_packed(self) -> bool:
        return self.position_ids is not None

    @property
    def n_sequences(self) -> int:
        """2B: chosen and rejected sequences (rows, or for a packed batch the number of packed sequences)."""
        if self.sequence_ids is not None:
            return int(self.sequence_ids[0, -1]) + 1  # sequences are packed in order
        return self.input_ids.shape[0]

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens in the batch, prompt included."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> "PairBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairBatch(move(self.input_ids), move(self.attention_mask), move(self.response_mask),
                         list(self.pair_ids), move(self.position_ids), move(self.sequence_ids))


def _ids(row: Mapping, key: str, i: int) -> list[int]:
    try:
        value = row[key]
    except KeyError:
        raise BatchingError(f"row {i} has no {key!r} field") from None
    ids = value.tolist() if hasattr(value, "tolist") else list(value)
    if not ids:
        raise BatchingError(f"row {i} (pair {row.get('pair_id')}) has an empty {key}: every scored response token "
                            "needs a prompt token before it and every response at least one token")
    return [int(x) for x in ids]


def pair_length(row: Mapping) -> int:
    """The longer of the pair's two rows (prompt + chosen, prompt + rejected), in tokens."""
    return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))


def _sequences(rows: Sequence[Mapping]) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) of every chosen row, then of every rejected row."""
    if not rows:
        raise BatchingError("cannot collate an empty list of pairs")
    prompts, responses = [], {"chosen_ids": [], "rejected_ids": []}
    for i, row in enumerate(rows):
        prompts.append(_ids(row, "prompt_ids", i))
        for key in responses:
            responses[key].append(_ids(row, key, i))
    return [(p, r) for key in ("chosen_ids", "rejected_ids") for p, r in zip(prompts, responses[key])]


def _pair_ids(rows: Sequence[Mapping]) -> list[str]:
    return [str(row.get("pair_id", i)) for i, row in enumerate(rows)]


def collate_pairs(rows: Sequence[Mapping], pad_id: int) -> PairBatch:
    """Build a ``PairBatch`` from tokenized pairs (``pair_id``, ``prompt_ids``, ``chosen_ids``, ``rejected_ids``).

    Response columns hold response ids only (as ``dpo_core.templating.tokenize_pairs`` writes them); each row of
    the batch is ``prompt_ids + response_ids``.
    """
    if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
        raise BatchingError(f"pad_id must be an int, got {type(pad_id).__name__}")
    sequences = _sequences(rows)
    width = max(len(p) + len(r) for p, r in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.bool)
    for r, (prompt, response) in enumerate(sequences):
        length = len(prompt) + len(response)
        input_ids[r, :length] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[r, :length] = 1
        response_mask[r, len(prompt) : length] = True
    return PairBatch(input_ids, attention_mask, response_mask, _pair_ids(rows))


def pack_pairs(rows: Sequence[Mapping]) -> PairBatch:
    """A padding-free ``PairBatch``: every chosen then every rejected sequence back to back in one row.

    Log-probs of a packed batch equal those of ``collate_pairs`` (see ``dpo_core.logprobs``); it saves the padding
    FLOPs when the attention kernel handles packed sequences (flash_attention_2's variable-length path).
    """
    sequences = _sequences(rows)
    ids, positions, owners, response = [], [], [], []
    for s, (prompt, answer) in enumerate(sequences):
        ids += prompt + answer
        positions += range(len(prompt) + len(answer))
        owners += [s] * (len(prompt) + len(answer))
        response += [False] * len(prompt) + [True] * len(answer)
    row = lambda values, dtype: torch.tensor([values], dtype=dtype)  # noqa: E731
    input_ids = row(ids, torch.long)
    return PairBatch(input_ids, torch.ones_like(input_ids), row(response, torch.bool), _pair_ids(rows),
                     position_ids=row(positions, torch.long), sequence_ids=row(owners, torch.long))


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, mega_batch_mult: int = 8, shuffle: bool = True
) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches of similar length; every index appears exactly once.

    Args:
        lengths: per-item lengths (e.g. ``pair_length`` of each tokenized pair).
        batch_size: items per batch; the very last batch may be smaller (nothing is dropped).
        seed: seeds the shuffle (pass ``seed + epoch`` for a new order per epoch).
        mega_batch_mult: mega-batch size in batches; 1 means "no grouping beyond a batch".
        shuffle: False keeps the input order of mega-batches (still sorted inside each one).
    """
    if batch_size < 1 or mega_batch_mult < 1:
        raise BatchingError(f"batch_size ({batch_size}) and mega_batch_mult ({mega_batch_mult}) must be >= 1")
    n = len(lengths)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    mega = batch_size * mega_batch_mult
    batches: list[list[int]] = []
    for start in range(0, n, mega):
        chunk = order[start : start + mega]
        chunk = chunk[np.argsort(-lengths_arr[chunk], kind="stable")]
        batches.extend([int(i) for i in chunk[b : b + batch_size]] for b in range(0, len(chunk), batch_size))
    return batches
