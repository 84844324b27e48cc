"""Unpaired rows (prompt, completion, label) for the unpaired objectives (KTO): pairs split in two, and the KTO rows.

* ``unpair``: each canonical pair becomes two canonical unpaired rows, chosen with label True and rejected with
  label False (TRL's ``unpair_preference_dataset``); ingest applies it to the training splits when the objective
  is unpaired (``TrainConfig.is_unpaired``).
* ``kto_rows``: each unpaired row gets a mismatched KL completion, another row's completion that it scores under
  its own prompt (KTO's reference point z_0 is the policy-reference log-ratio of those; ``dpo_core.losses.kto_kl``).
  The result is laid out exactly like a pair (``pair_id`` = ``row_id``, ``chosen`` = the completion, ``rejected`` =
  the KL completion) plus ``label`` and ``kl_row_id``, so templating, the reference precompute, the batch layouts and
  the scorer treat it as any pair; the template stage writes it into the tokenized table, so a resumed or cached run
  sees the same mismatch.

The mismatch is chosen per split, seeded: the split's rows are shuffled (``numpy.random.default_rng(seed)``) and
each row takes the completion of the row before it in that order (TRL's rotation by one), skipping rows with the same
prompt or the same completion text (a pair's other answer is no mismatch). A split whose rows all share one prompt
has nothing to mismatch with: a DataError.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from data_contracts.errors import DataError
from data_contracts.pairs import PAIR_COLUMNS
from data_contracts.unpaired import UNPAIRED_COLUMNS
from dpo_data.formats import make_row_id

__all__ = ["unpair", "kto_rows", "KTO_COLUMNS"]

# a KTO row: a pair's columns plus its label and the row whose completion is its KL completion
KTO_COLUMNS = [*PAIR_COLUMNS, "label", "kl_row_id"]


def unpair(pairs: pd.DataFrame) -> pd.DataFrame:
    """Canonical pairs -> canonical unpaired rows (``UNPAIRED_COLUMNS``): per pair, its chosen answer with label True,
    then its rejected answer with label False; prompt, source, meta and split are kept."""
    rows = []
    for pair in pairs[PAIR_COLUMNS].to_dict("records"):
        for completion, label in ((pair["chosen"], True), (pair["rejected"], False)):
            rows.append({"row_id": make_row_id(pair["prompt"], completion, label), "prompt": pair["prompt"],
                         "completion": completion, "label": label, "source": pair["source"], "meta": pair["meta"],
                         "split": pair["split"]})
    return pd.DataFrame(rows, columns=UNPAIRED_COLUMNS).astype({"label": bool})


def _prompt_key(prompt) -> str:
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in prompt], sort_keys=True)


def kto_rows(unpaired: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Canonical unpaired rows -> KTO rows (``KTO_COLUMNS``, in the input order), each with its seeded mismatched KL
    completion from the same split (see the module docstring). DataError for a split with one distinct prompt."""
    out: dict[object, dict] = {}
    for split, group in unpaired.groupby("split", sort=False):
        rows = group.to_dict("records")
        index = list(group.index)
        prompts = [_prompt_key(r["prompt"]) for r in rows]
        order = np.random.default_rng(seed).permutation(len(rows))
        kl_of: dict[int, int] = {}
        for k, i in enumerate(order):
            for step in range(1, len(rows)):
                j = order[(k - step) % len(rows)]
                if prompts[j] != prompts[i] and rows[j]["completion"] != rows[i]["completion"]:
                    kl_of[int(i)] = int(j)
                    break
            else:
                raise DataError(f"split '{split}' has {len(rows)} unpaired row(s) that all share one prompt (or one "
                                "completion): KTO's KL reference point needs completions of other prompts")
        for i, row in enumerate(rows):
            other = rows[kl_of[i]]
            out[index[i]] = ({"pair_id": row["row_id"], "prompt": row["prompt"], "chosen": row["completion"],
                        "rejected": other["completion"], "source": row["source"], "meta": row["meta"],
                        "split": split, "label": bool(row["label"]), "kl_row_id": other["row_id"]})
    return pd.DataFrame([out[i] for i in unpaired.index], columns=KTO_COLUMNS)
