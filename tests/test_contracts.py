"""The pandera contracts: each accepts a good table and rejects a bad one with every failure reported at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts.errors import ContractError
from data_contracts.pairs import PAIR_COLUMNS, pair_failures, prompt_problem, validate_pairs
from data_contracts.reference import ReferenceLogps, validate_reference
from data_contracts.tokenized import TokenizedPairs, tokenized_failures, validate_tokenized
from dpo_core.reference import REFERENCE_COLUMNS
from dpo_core.templating import TOKENIZED_COLUMNS
from dpo_data.formats import make_pair_id

REPO = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "Hi?"}]


def _pair(prompt=None, chosen="Hello!", rejected="Go away.", **kw) -> dict:
    prompt = USER if prompt is None else prompt
    row = {"pair_id": make_pair_id(prompt, chosen, rejected) if isinstance(chosen, str) and isinstance(rejected, str)
           and isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt) else "0" * 16,
           "prompt": prompt, "chosen": chosen, "rejected": rejected, "source": "test", "meta": "{}",
           "split": "train"}
    row.update(kw)
    return row


# ---------------------------------------------------------------------------------------------- canonical pairs


@pytest.mark.parametrize(
    "prompt, problem",
    [
        ([{"role": "user", "content": "q"}], None),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
          {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}], None),
        ([], "prompt_malformed"),
        ("just text", "prompt_malformed"),
        ([{"role": "user"}], "prompt_malformed"),
        ([{"role": "tool", "content": "x"}, {"role": "user", "content": "q"}], "prompt_bad_role"),
        ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "prompt_role_order"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "prompt_role_order"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], "prompt_role_order"),
        ([{"role": "system", "content": "s"}], "prompt_role_order"),
    ],
)
def test_prompt_roles_and_order(prompt, problem):
    assert prompt_problem(prompt) == problem


def test_good_pairs_pass():
    df = pd.DataFrame([_pair(), _pair(chosen="Hi!", split="eval", meta=json.dumps({"score": 1}))],
                      columns=PAIR_COLUMNS)
    assert validate_pairs(df) is df


def test_bad_pairs_report_every_failure_at_once():
    rows = [
        _pair(),  # 0: fine
        _pair(chosen="  \n"),  # 1: blank chosen
        _pair(rejected=""),  # 2: blank rejected
        _pair(chosen="Same.", rejected="Same. "),  # 3: chosen == rejected (after stripping)
        _pair(prompt=[{"role": "user", "content": "   "}]),  # 4: blank prompt
        _pair(prompt=[{"role": "bot", "content": "x"}]),  # 5: bad role
        _pair(chosen="Other.", meta="not json", source=" "),  # 6: meta and source
        _pair(chosen="x" * 50),  # 7: too long (bound 40 below)
        _pair(prompt=[{"role": "user", "content": "p" * 41}]),  # 8: prompt too long
    ]
    rows.append(dict(rows[0]))  # 9: duplicate pair_id
    rows.append(_pair(pair_id="NOT-HEX"))  # 10
    df = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    failures = pair_failures(df, max_response_chars=40, max_prompt_chars=40)
    assert failures.rows == {
        0: ["duplicate_pair_id"], 1: ["blank_chosen"], 2: ["blank_rejected"], 3: ["chosen_equals_rejected"],
        4: ["blank_prompt"], 5: ["prompt_bad_role"], 6: ["blank_source", "meta_not_json"], 7: ["chosen_too_long"],
        8: ["prompt_too_long"], 9: ["duplicate_pair_id"], 10: ["bad_pair_id"],
    }
    with pytest.raises(ContractError) as err:
        validate_pairs(df, max_response_chars=40, max_prompt_chars=40)
    assert err.value.counts["duplicate_pair_id"] == 2 and len(err.value.counts) == 11
    assert "11 row(s) fail" in str(err.value) and "\n" not in str(err.value)


def test_min_chars_and_missing_columns_and_nulls():
    df = pd.DataFrame([_pair(chosen="ok"), _pair(chosen=None)], columns=PAIR_COLUMNS)
    f = pair_failures(df, min_chars=3)
    assert f.rows == {0: ["chosen_too_short"], 1: ["null_chosen"]}
    with pytest.raises(ContractError, match="missing_column_split"):
        validate_pairs(df.drop(columns=["split"]))


# ---------------------------------------------------------------------------------------------- tokenized pairs

HEADER = [1, 2]


def _tok(pid: str, prompt=(7, 1, 2), chosen=(5, 6), rejected=(8,), **kw) -> dict:
    row = {"pair_id": pid, "split": "train", "prompt_ids": list(prompt), "chosen_ids": list(chosen),
           "rejected_ids": list(rejected), "prompt_truncated": False, "chosen_truncated": False,
           "rejected_truncated": False}
    row.update(kw)
    return row


def test_good_tokenized_table_passes_also_after_parquet(tmp_path):
    df = pd.DataFrame([_tok("a"), _tok("b", chosen=(5, 6, 9), rejected_truncated=True)])
    assert validate_tokenized(df, 6, generation_header_ids=HEADER) is df
    # Parquet gives numpy arrays of int32 back: still valid
    pq.write_table(pa.Table.from_pandas(df.astype({c: object for c in ["prompt_ids", "chosen_ids", "rejected_ids"]}),
                                        preserve_index=False), tmp_path / "t.parquet")
    back = pd.read_parquet(tmp_path / "t.parquet")
    validate_tokenized(back, 6, generation_header_ids=HEADER)


def test_bad_tokenized_table_reports_every_failure_at_once():
    df = pd.DataFrame([
        _tok("ok"),
        _tok("long", chosen=(5, 6, 7, 8)),  # 3 + 4 > 6
        _tok("empty", rejected=()),
        _tok("header", prompt=(7, 2, 1)),
        _tok("neg", chosen=(-1,)),
        _tok("dup"), _tok("dup"),
    ])
    failures = tokenized_failures(df, 6, HEADER)
    assert failures.rows == {1: ["chosen_exceeds_max_length"], 2: ["empty_rejected_ids"],
                             3: ["missing_generation_header"], 4: ["bad_token_ids"], 5: ["duplicate_pair_id"],
                             6: ["duplicate_pair_id"]}
    with pytest.raises(ContractError) as err:
        validate_tokenized(df, 6, generation_header_ids=HEADER)
    assert set(err.value.counts) == {"chosen_exceeds_max_length", "empty_rejected_ids", "missing_generation_header",
                                     "bad_token_ids", "duplicate_pair_id"}
    # without the header argument the prefix check is not applied
    assert "missing_generation_header" not in tokenized_failures(df, 6).counts()
    with pytest.raises(ContractError, match="wrong_dtype_prompt_truncated"):
        validate_tokenized(df.iloc[:1].assign(prompt_truncated="no"), 6)


def test_real_template_output_satisfies_the_contract(tokenizer, tmp_path):
    """The template stage's own output (SmolLM2 chat template) on shipped pairs passes TokenizedPairs."""
    from dpo_data.ingest import ingest
    from dpo_core.config import DataConfig, SourceConfig
    from dpo_core.templating import ChatRenderer, tokenize_pairs

    cfg = DataConfig(train=[SourceConfig(path="data/llamafactory_dpo_en_demo/dpo_en_demo.json")], eval=None)
    pairs = ingest(cfg, root=REPO, quarantine_path=tmp_path / "q.jsonl").pairs.head(24)
    tokenized, report = tokenize_pairs(pairs, tokenizer, max_length=128, max_prompt_length=64)
    header = ChatRenderer(tokenizer).header_ids
    assert len(tokenized) == 24 - len(report.rejected)
    validate_tokenized(tokenized, 128, generation_header_ids=header)
    with pytest.raises(ContractError, match="exceeds_max_length"):
        validate_tokenized(tokenized, 64, generation_header_ids=header)


# ---------------------------------------------------------------------------------------------- reference log-probs


def _ref(pids, chosen_tokens=(2, 3), rejected_tokens=(1, 1), chosen=(-1.5, -2.0), rejected=(-3.0, -0.5),
         chosen_shared=None):
    # the shared length is the rejected one (1 token): the chosen sums' first token, the rejected sums whole
    chosen_shared = chosen_shared or tuple(c / 2 for c in chosen)
    return pd.DataFrame({"pair_id": list(pids), "chosen_logps": np.array(chosen, dtype=np.float64),
                         "rejected_logps": np.array(rejected, dtype=np.float64),
                         "chosen_tokens": np.array(chosen_tokens, dtype=np.int64),
                         "rejected_tokens": np.array(rejected_tokens, dtype=np.int64),
                         "chosen_shared_logps": np.array(chosen_shared, dtype=np.float64),
                         "rejected_shared_logps": np.array(rejected, dtype=np.float64)})


@pytest.mark.parametrize("produced, contract", [(TOKENIZED_COLUMNS, TokenizedPairs), (REFERENCE_COLUMNS, ReferenceLogps)])
def test_the_producers_columns_are_the_contracts_columns(produced, contract):
    """dpo_core writes the tables and may not import their contracts: its column lists must stay the schemas'."""
    assert produced == list(contract.to_schema().columns)


def test_good_reference_table_passes():
    tok = pd.DataFrame([_tok("a"), _tok("b", chosen=(5, 6, 9))])
    ref = _ref(["a", "b"])
    assert validate_reference(ref, tok) is ref


def test_bad_reference_table_reports_every_failure_at_once():
    tok = pd.DataFrame([_tok("a"), _tok("b"), _tok("c")])
    ref = _ref(["a", "zz", "a"], chosen_tokens=(2, 0, 5), rejected_tokens=(1, 1, 1),
               chosen=(np.inf, -1.0, -1.0), rejected=(-1.0, 0.3, -1.0), chosen_shared=(-1.0, -0.5, -1.5))
    with pytest.raises(ContractError) as err:
        validate_reference(ref, tok)
    assert err.value.counts == {
        "nonfinite_chosen_logps": 1, "positive_rejected_logps": 1, "nonpositive_chosen_tokens": 1,
        "shared_exceeds_chosen_logps": 1,  # -1.5 over a whole of -1.0
        "duplicate_pair_id": 2, "unknown_pair_id": 1, "chosen_token_count_mismatch": 1,
        "missing_pair_id": 2,  # b and c have no row
    }
    assert err.value.examples["missing_pair_id"] == ["b", "c"]
    with pytest.raises(ContractError, match="wrong_dtype_chosen_tokens"):
        validate_reference(_ref(["a", "b"]).astype({"chosen_tokens": np.float64}), tok.iloc[:2])
