"""Batching preference pairs so that the chosen and rejected sequences of a batch go through the model in one forward.

Three layouts (``LAYOUTS``), all returning a ``PairBatch``: ``shared_prompt`` (``share_prompt_pairs``, the default
where attention takes a 4-D mask), ``padded`` (``collate_pairs``) and ``packed`` (``pack_pairs``). In every layout
``response_mask[r, t]`` is True exactly where the token at position ``t`` of row ``r`` is a response token; log-probs
are scored from that mask, never by counting from the end of a sequence.

``collate_pairs`` concatenates two right-padded row groups: rows ``0..B-1`` are ``prompt + chosen``, rows
``B..2B-1`` are ``prompt + rejected``, so that every real token keeps its natural position ids ``0..n-1``.

``pack_pairs`` is the padding-free alternative: all 2B sequences concatenated into ONE row, ``position_ids``
restarting at 0 for every sequence and no attention mask, so that transformers builds a block-diagonal causal mask
(flash_attention_2 runs it as variable-length sequences; sdpa/eager get an explicit mask). ``sequence_ids`` says
which of the 2B sequences (chosen 0..B-1, rejected B..2B-1) each token belongs to.

``share_prompt_pairs`` is the layout that does the least work on CPU/SDPA: each pair is ONE row
``prompt + chosen + rejected``, so every prompt token goes through the network once instead of twice. The rejected
response's position ids restart where the prompt ends (``0..P-1, P..P+C-1, P..P+R-1``) and a 4-D attention mask
(causal, except that rejected tokens do not see chosen tokens) gives every response token exactly the context it has
in its own ``prompt + response`` row; the first rejected token is predicted from the last prompt position
(``predictor_ids``). Log-probs equal those of ``collate_pairs`` (tests/test_logprobs.py). This is the idea of
"prefix sharing" for preference pairs (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix
Sharing", arXiv 2410.20305); ``make_batch`` picks a layout by name and ``resolve_layout`` picks ``auto``.

``length_grouped_batches`` cuts padding the way Hugging Face's ``LengthGroupedSampler`` does: shuffle the indices
(seeded), split them into mega-batches of ``batch_size * mega_batch_mult``, sort each mega-batch by length
(longest first) and cut it into batches. The order is a pure function of ``(lengths, batch_size, seed,
mega_batch_mult)``, which is what makes a resumed run see exactly the data of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

__all__ = ["BatchingError", "PairBatch", "BatchLayout", "LAYOUTS", "collate_pairs", "pack_pairs", "share_prompt_pairs",
           "make_batch", "resolve_layout", "MASK_4D_ATTENTION", "length_grouped_batches", "pair_length"]

BatchLayout = Literal["padded", "packed", "shared_prompt"]
LAYOUTS: tuple[str, ...] = ("padded", "packed", "shared_prompt")
# attention implementations that take a custom 4-D mask as given (transformers' masking_utils passes a 4-D mask
# through unchanged); flash_attention_2 and flex_attention do not
MASK_4D_ATTENTION = ("sdpa", "eager")


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
        position_ids: packed and shared-prompt batches: Long[R, T], restarting at 0 for every sequence (packed) or
            at the prompt's end for the rejected response (shared prompt).
        sequence_ids: packed and shared-prompt batches: Long[R, T], the sequence (0..2B-1: chosen of pair b is b,
            rejected is B + b) each scored token belongs to; -1 on shared-prompt positions that are not responses.
        attention_4d: shared-prompt batches only: Bool[B, 1, T, T], True where a query may attend to a key.
        predictor_ids: shared-prompt batches only: Long[B, T], the position whose hidden state predicts the response
            token at each position (``t - 1``, except the first rejected token: the last prompt position); -1 elsewhere.

    A packed batch has the same fields with one row of N tokens (``attention_mask`` all ones: nothing is padding).
    A shared-prompt batch has B rows ``prompt + chosen + rejected``; ``attention_mask`` marks its real tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    pair_ids: list[str]
    position_ids: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None
    attention_4d: torch.Tensor | None = None
    predictor_ids: torch.Tensor | None = None

    @property
    def layout(self) -> str:
        if self.attention_4d is not None:
            return "shared_prompt"
        return "packed" if self.position_ids is not None else "padded"

    @property
    def is_packed(self) -> bool:
        return self.layout == "packed"

    @property
    def n_sequences(self) -> int:
        """2B: chosen and rejected sequences (rows, or for a packed batch the number of packed sequences)."""
        if self.layout == "shared_prompt":
            return 2 * self.input_ids.shape[0]
        if self.sequence_ids is not None:
            return int(self.sequence_ids[0, -1]) + 1  # sequences are packed in order
        return self.input_ids.shape[0]

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) positions the model computes, prompt included (for a shared prompt: once per pair)."""
        return int(self.attention_mask.sum())

    @property
    def n_sequence_tokens(self) -> int:
        """Tokens of the 2B sequences ``prompt + chosen`` and ``prompt + rejected``: the same number in every layout
        (a shared prompt counts twice, as in the two sequences it stands for). Trained tokens/s counts these."""
        if self.layout != "shared_prompt":
            return self.n_tokens
        prompt_tokens = int((self.attention_mask.bool() & ~self.response_mask).sum())
        return self.n_tokens + prompt_tokens

    def tensors(self) -> dict[str, torch.Tensor]:
        """The batch's tensors by field name (what a ``DistributedDataParallel`` forward receives)."""
        names = ("input_ids", "attention_mask", "response_mask", "position_ids", "sequence_ids", "attention_4d",
                 "predictor_ids")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(pair_ids=list(self.pair_ids), **{k: v.to(device) for k, v in self.tensors().items()})


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


def share_prompt_pairs(rows: Sequence[Mapping], pad_id: int) -> PairBatch:
    """A ``PairBatch`` with one right-padded row ``prompt + chosen + rejected`` per pair (see the module docstring).

    Scores exactly what ``collate_pairs`` scores with ``P + C + R`` positions per pair instead of ``2P + C + R``
    (plus padding to the longest row), which is what makes it the fastest layout where attention takes a 4-D mask.
    """
    if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
        raise BatchingError(f"pad_id must be an int, got {type(pad_id).__name__}")
    sequences = _sequences(rows)
    b = len(sequences) // 2
    parts = [(sequences[i][0], sequences[i][1], sequences[b + i][1]) for i in range(b)]
    width = max(len(p) + len(c) + len(r) for p, c, r in parts)
    input_ids = torch.full((b, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    response_mask = torch.zeros((b, width), dtype=torch.bool)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    sequence_ids = torch.full((b, width), -1, dtype=torch.long)
    predictor_ids = torch.full((b, width), -1, dtype=torch.long)
    # start from "every position attends to itself only" (padding queries then have no all-masked row: no NaN)
    attention_4d = torch.eye(width, dtype=torch.bool).repeat(b, 1, 1, 1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for i, (prompt, chosen, rejected) in enumerate(parts):
        n_p, n_c, n_r = len(prompt), len(chosen), len(rejected)
        n, end_c = n_p + n_c + n_r, n_p + n_c
        input_ids[i, :n] = torch.tensor(prompt + chosen + rejected, dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, n_p:n] = True
        position_ids[i, :end_c] = torch.arange(end_c)
        position_ids[i, end_c:n] = torch.arange(n_p, n_p + n_r)
        sequence_ids[i, n_p:end_c], sequence_ids[i, end_c:n] = i, b + i
        predictor_ids[i, n_p:n] = torch.arange(n_p - 1, n - 1)
        predictor_ids[i, end_c] = n_p - 1  # the first rejected token follows the prompt, not the chosen response
        attention_4d[i, 0, :n, :n] = causal[:n, :n]
        attention_4d[i, 0, end_c:n, n_p:end_c] = False  # rejected tokens do not see the chosen response
    return PairBatch(input_ids, attention_mask, response_mask, _pair_ids(rows), position_ids=position_ids,
                     sequence_ids=sequence_ids, attention_4d=attention_4d, predictor_ids=predictor_ids)


def resolve_layout(layout: str, attn_implementation: str | None) -> str:
    """The concrete layout for ``layout`` (``auto`` or one of ``LAYOUTS``) and the model's attention implementation.

    ``auto`` is ``shared_prompt`` where attention takes a custom 4-D mask (sdpa, eager) and ``padded`` otherwise
    (flash_attention_2: choose ``packed`` there explicitly for its variable-length path). An explicit
    ``shared_prompt`` with an attention that cannot take its mask is an error.
    """
    if layout == "auto":
        return "shared_prompt" if attn_implementation in MASK_4D_ATTENTION else "padded"
    if layout not in LAYOUTS:
        raise BatchingError(f"unknown batch layout {layout!r}; expected auto or one of {list(LAYOUTS)}")
    if layout == "shared_prompt" and attn_implementation not in MASK_4D_ATTENTION:
        raise BatchingError(f"batch layout 'shared_prompt' needs an attention implementation that takes a 4-D mask "
                            f"({', '.join(MASK_4D_ATTENTION)}), not {attn_implementation!r}; use 'padded' or 'packed'")
    return layout


def make_batch(rows: Sequence[Mapping], pad_id: int, layout: str) -> PairBatch:
    """A ``PairBatch`` of ``rows`` in a concrete ``layout`` (``padded``, ``packed`` or ``shared_prompt``)."""
    if layout == "padded":
        return collate_pairs(rows, pad_id)
    if layout == "packed":
        return pack_pairs(rows)
    if layout == "shared_prompt":
        return share_prompt_pairs(rows, pad_id)
    raise BatchingError(f"unknown batch layout {layout!r}; expected one of {list(LAYOUTS)} (resolve 'auto' first)")


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
