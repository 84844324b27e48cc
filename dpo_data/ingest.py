"""Ingest: every configured preference source -> one validated canonical-pairs table, a report and a fingerprint.

For each split's sources (``data.train``, ``data.eval``, each ``data.extra_eval`` set) every record is read
(`dpo_data.formats`), converted by its format's adapter, de-duplicated by ``pair_id`` and validated lazily against
`data_contracts.pairs.CanonicalPairs` with the configured bounds. Rows that fail go to the quarantine file with the
checks they failed; nothing is dropped silently: for every split

    read = accepted + quarantined + duplicates_removed

``duplicates_removed`` counts exact duplicates (same prompt, chosen and rejected, i.e. the same ``pair_id``) within
the split and pairs already taken by an earlier split (train, then eval, then the extra sets in config order), so no
pair is in two splits. With ``data.eval: null`` the accepted train pairs are split by a hash of ``pair_id``: a pair's
split never changes when data is appended. ``data.validation_fraction`` carves a ``validation`` split from the
remaining train pairs the same way (an independent hash of ``pair_id``): it is what model selection (checkpoints,
hyperparameter sweeps) is judged on, so the eval split is scored once, at the end. ``max_eval_pairs``,
``max_validation_pairs`` and ``max_extra_eval_pairs`` then keep the first N pairs of a split (file order);
``data.select`` picks the train pairs: the first ``max_train_pairs`` in file order (``first``), the newest
``max_train_pairs`` by arrival (``newest``) or every one (``all``). The pairs not kept are counted in
``left_out_by_max_pairs`` (accepted, not lost).

Arrival (``newest``): a pair arrives at its record's ``added_at`` field when it has one (epoch seconds, or an ISO 8601
date/time, UTC unless it names a zone; anything else quarantines the row as ``bad_added_at``), else at the
modification time of the file it was read from; ties (one file) keep file order, then relative file path. A pair
read more than once arrives at its earliest time. The order is stable across runs as long as files are not rewritten:
new data goes into a new file (appending to a file moves all its rows to the file's new modification time).

The promotion gate's pairs are taken before anything else, so they never train, even when they reappear in the data
files (they count as ``duplicates_across_splits`` there): an explicit gate set (``gate_source``) as split ``gate``, or
the pinned eval split of an earlier run (``pinned_eval``, canonical pairs) as split ``eval``.

With ``on_invalid: fail`` any invalid row fails the stage; with ``quarantine`` a split whose invalid fraction exceeds
``max_invalid_fraction`` fails it; both with a message that counts rows per failed check and names the quarantine
file (which is written first).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.errors import ContractError, DataError
from data_contracts.pairs import PAIR_COLUMNS, pair_failures, validate_pairs
from data_contracts.unpaired import UNPAIRED_COLUMNS, unpaired_failures, validate_unpaired
from dpo_data.quarantine import QuarantineEntry, count_checks, write_quarantine
from dpo_core.config import UNPAIRED_FORMATS, VALIDATION_SPLIT, DataConfig, SourceConfig
from dpo_core.fileio import atomic_file, sha256_file
from dpo_data.formats import (
    FormatError,
    RawRecord,
    RecordError,
    UnpairedRecord,
    check_fields,
    detect_file_format,
    json_safe,
    make_pair_id,
    make_row_id,
    read_records,
    to_canonical,
)
from dpo_data.unpaired import unpair

__all__ = ["IngestResult", "ingest", "write_pairs", "read_pairs", "write_unpaired", "read_unpaired", "TRAINING_SPLITS", "in_hashed_split", "pairs_fingerprint",
           "pair_set_id", "arrival_time", "report_rows", "CHECK_DESCRIPTIONS", "GATE_SPLIT"]

GATE_SPLIT = "gate"  # the promotion gate's own pairs (README "Scheduled retraining")
TRAINING_SPLITS = ("train", VALIDATION_SPLIT)  # the splits an unpaired objective reads as unpaired rows

# what each quarantine check means (reader, adapter and contract checks)
CHECK_DESCRIPTIONS: dict[str, str] = {
    "malformed_json": "the line is not valid JSON",
    "invalid_utf8": "the bytes are not valid UTF-8",
    "not_an_object": "the JSON value is not an object",
    "malformed_csv": "the CSV row has more cells than the header",
    "missing_field": "a required field is missing or null",
    "wrong_type": "a field has the wrong type (e.g. a number where text is expected)",
    "bad_label": "the preference label is outside its allowed values (ties cannot be a pair; unpaired: a boolean)",
    "blank_completion": "completion is empty or whitespace-only",
    "completion_too_long": "completion is longer than data.max_response_chars",
    "completion_too_short": "completion is shorter than data.min_chars",
    "hh_prompt_mismatch": "the two HH transcripts differ before the last assistant turn",
    "hh_malformed_transcript": "the HH transcript has no Human/Assistant turn structure",
    "prompt_mismatch": "the two conversations differ before the last turn",
    "unsupported_response": "a response holds more than one message",
    "bad_response_role": "a response is not an assistant message",
    "unknown_format": "the record matches no supported format",
    "blank_prompt": "a prompt message is empty or whitespace-only",
    "blank_chosen": "chosen is empty or whitespace-only",
    "blank_rejected": "rejected is empty or whitespace-only",
    "chosen_equals_rejected": "chosen and rejected are the same text",
    "prompt_malformed": "the prompt is not a non-empty list of {role, content} messages",
    "prompt_bad_role": "a prompt message has a role other than system/user/assistant",
    "prompt_role_order": "prompt roles are not [system] user (assistant user)*",
    "prompt_too_long": "the prompt is longer than data.max_prompt_chars",
    "chosen_too_long": "chosen is longer than data.max_response_chars",
    "rejected_too_long": "rejected is longer than data.max_response_chars",
    "chosen_too_short": "chosen is shorter than data.min_chars",
    "rejected_too_short": "rejected is shorter than data.min_chars",
    "bad_added_at": "added_at is neither epoch seconds nor an ISO 8601 date/time",
}
# ingest's working columns: a pair's, an unpaired row's completion and label (its id in pair_id), which kind it is
_ROW_COLUMNS = [*PAIR_COLUMNS, "completion", "label", "_kind"]
_PRIVATE = ["_source", "_record", "_arrival", "_file"]
_ARRIVAL_ORDER = ["_arrival", "_file", "_row"]
_PROMPT_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_UNPAIRED_ARROW_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    ("prompt", _PROMPT_TYPE),
    ("completion", pa.string()),
    ("label", pa.bool_()),
    ("source", pa.string()),
    ("meta", pa.string()),
    ("split", pa.string()),
])
_ARROW_SCHEMA = pa.schema([
    ("pair_id", pa.string()),
    ("prompt", _PROMPT_TYPE),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("source", pa.string()),
    ("meta", pa.string()),
    ("split", pa.string()),
])


@dataclass
class IngestResult:
    """``pairs``: the canonical table (PAIR_COLUMNS, every split); ``report``: counts (see ingest); ``fingerprint``:
    16-hex content hash of the pairs (then unpaired rows) used (split + id, in order); ``train_fingerprint``:
    `pair_set_id` of the train pairs, or of the train unpaired rows for an unpaired objective (what "nothing new"
    compares); ``unpaired``: the canonical unpaired rows (UNPAIRED_COLUMNS; empty unless ingested with
    ``unpaired=True``)."""

    pairs: pd.DataFrame
    report: dict[str, Any]
    fingerprint: str
    quarantine_path: Path
    train_fingerprint: str
    unpaired: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=UNPAIRED_COLUMNS))


def in_hashed_split(pair_id: str, fraction: float, split: str = "eval") -> bool:
    """Whether a pair goes to the hashed split `split` (``eval`` or ``validation``): a function of its id and the
    split's name alone, so appending data moves nothing, and the two splits are drawn independently."""
    h = int(hashlib.sha256(f"{split}-split:{pair_id}".encode()).hexdigest()[:15], 16)
    return h / 16**15 < fraction


def pairs_fingerprint(pairs: pd.DataFrame) -> str:
    """sha256 of the ordered (split, pair_id) list, 16 hex: changes when any pair's content, split or order does."""
    h = hashlib.sha256()
    for split, pid in zip(pairs["split"], pairs["pair_id"], strict=True):
        h.update(f"{split}\t{pid}\n".encode())
    return h.hexdigest()[:16]


def pair_set_id(pair_ids: Iterable[str]) -> str:
    """sha256 of the sorted distinct pair ids, 16 hex: the identity of a set of pairs, whatever their order."""
    h = hashlib.sha256()
    for pid in sorted(set(pair_ids)):
        h.update(f"{pid}\n".encode())
    return h.hexdigest()[:16]


def arrival_time(value: Any) -> float:
    """Seconds since the epoch of an ``added_at`` value: a number (epoch seconds) or an ISO 8601 date or date/time
    (UTC unless it names a zone). ValueError for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"added_at {value!r} is not finite")
        return float(value)
    if isinstance(value, str):
        stamp = datetime.fromisoformat(value.strip())
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)
        return stamp.timestamp()
    raise ValueError(f"added_at {value!r} is not a number or a date/time string")


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds")


def _file_facts(file: str) -> tuple[float, str | None]:
    """A data file's modification time and sha256 (0 and None for what is not a local file, e.g. a hub dataset)."""
    try:
        return os.stat(file).st_mtime, sha256_file(file)
    except OSError:
        return 0.0, None


def _label(src: SourceConfig) -> str:
    return src.name or Path(src.path.rstrip("/")).name or src.path


def _rel(file: str, root: Path) -> str:
    """A file path relative to the ingest root where it lies under it (stable across checkouts)."""
    try:
        return Path(file).resolve().relative_to(root.resolve()).as_posix()
    except (ValueError, OSError):
        return file


def _entry(split: str, label: str, rec: RawRecord, checks: list[str], details: list[str],
           root: Path) -> QuarantineEntry:
    return QuarantineEntry(split=split, source=label, file=_rel(rec.file, root), row=rec.row, line=rec.line, checks=checks,
                           errors=details, record=json_safe(rec.record) if rec.record is not None else None,
                           raw=rec.raw)


def _read_source(split: str, idx: int, src: SourceConfig, root: Path, unpaired: bool = False,
                 ) -> tuple[list[dict[str, Any]], list[QuarantineEntry], dict[str, Any]]:
    """Rows that converted, entries for records that did not, and the source's report stub. Unpaired records are
    a DataError unless ``unpaired`` (the objective reads them)."""
    label = _label(src)
    where = f"data.{split} source '{label}'"
    try:
        check_fields(src.format, src.fields)
        records = list(read_records(src.path, root=root, split=src.split))
    except FormatError as exc:
        raise DataError(f"{where}: {exc}") from exc
    if not records:
        raise DataError(f"{where} ({src.path}) holds no records: the file is empty")
    rows: list[dict[str, Any]] = []
    entries: list[QuarantineEntry] = []
    formats: dict[str, str] = {}
    files: dict[str, dict[str, Any]] = {}
    for file, group in itertools.groupby(records, key=lambda r: r.file):
        recs = list(group)
        fmt = src.format
        if fmt == "auto":
            if any(r.record is not None for r in recs):
                try:
                    fmt = detect_file_format(recs, src.fields, file)
                except FormatError as exc:
                    raise DataError(f"{where}: {exc}") from exc
            else:
                fmt = "unreadable"  # nothing readable: every record is quarantined with its read error below
        rel = _rel(file, root)
        if fmt in UNPAIRED_FORMATS and not unpaired:
            raise DataError(f"{where}: {rel} holds unpaired rows (format {fmt}: prompt, completion, label); only an "
                            "unpaired objective trains on them (train.loss=kto), and the promotion gate needs pairs")
        formats[rel] = fmt
        modified, digest = _file_facts(file)
        files[rel] = {"format": fmt, "records": len(recs), "sha256": digest, "modified": _iso(modified)}
        for rec in recs:
            if rec.record is None:
                entries.append(_entry(split, label, rec, [rec.error or "unreadable"], [rec.detail or ""], root))
                continue
            try:
                canon = to_canonical(rec.record, fmt, src.fields)
            except RecordError as exc:
                entries.append(_entry(split, label, rec, [exc.reason], [exc.detail], root))
                continue
            arrival = modified
            if canon.meta.get("added_at") is not None:
                try:
                    arrival = arrival_time(canon.meta["added_at"])
                except ValueError as exc:
                    entries.append(_entry(split, label, rec, ["bad_added_at"], [str(exc)], root))
                    continue
            if isinstance(canon, UnpairedRecord):
                content = {"pair_id": make_row_id(canon.prompt, canon.completion, canon.label), "chosen": None,
                           "rejected": None, "completion": canon.completion, "label": canon.label,
                           "_kind": "unpaired"}
            else:
                content = {"pair_id": make_pair_id(canon.prompt, canon.chosen, canon.rejected),
                           "chosen": canon.chosen, "rejected": canon.rejected, "completion": None, "label": None,
                           "_kind": "pair"}
            rows.append({
                **content,
                "prompt": canon.prompt,
                "source": label,
                "meta": json.dumps(json_safe(canon.meta), sort_keys=True, ensure_ascii=False),
                "split": split,
                "_source": idx,  # which source (for per-source counts)
                "_record": rec,  # where it came from (for a quarantine entry)
                "_arrival": arrival,  # when it arrived (data.select=newest), then where: file, row
                "_file": rel,
                "_row": rec.row,
            })
    report = {"name": label, "path": src.path, "formats": formats, "files": files, "read": len(records),
              "quarantined": len(entries)}
    return rows, entries, report


def _ingest_split(split: str, sources: list[SourceConfig], root: Path, bounds: dict[str, int], taken: set[str],
                  unpaired: bool = False) -> tuple[pd.DataFrame, list[QuarantineEntry], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    entries: list[QuarantineEntry] = []
    src_reports: list[dict[str, Any]] = []
    for idx, src in enumerate(sources):
        r, e, rep = _read_source(split, idx, src, root, unpaired)
        rows += r
        entries += e
        src_reports.append(rep)
    df = pd.DataFrame(rows, columns=_ROW_COLUMNS + _PRIVATE + ["_row"])
    if df.empty:  # no row converted: give the text columns their dtype so the contract sees a typed empty table
        df = df.astype({c: "str" for c in PAIR_COLUMNS if c != "prompt"})
    else:  # a pair read more than once arrives when it was first seen
        df["_arrival"] = df.groupby("pair_id")["_arrival"].transform("min")
    # exact duplicates: within this split (keep the first), and pairs an earlier split already holds
    within = df["pair_id"].duplicated(keep="first")
    across = df["pair_id"].isin(taken) & ~within
    dup = within | across
    dup_per_source = Counter(df.loc[dup, "_source"])
    df = df.loc[~dup]
    failures = _failures(df, bounds)
    if failures.table:  # adapters always produce the right columns and types: this is a bug, not bad data
        raise ContractError("canonical pairs / unpaired rows", failures.counts())
    bad_per_source: Counter[int] = Counter()
    for index, checks in failures.rows.items():
        row = df.loc[index]
        entries.append(_entry(split, str(row["source"]), row["_record"], checks,
                              [f"{c}: {CHECK_DESCRIPTIONS.get(c, c)}" for c in checks], root))
        bad_per_source[int(row["_source"])] += 1
    accepted = df.drop(index=list(failures.rows)).reset_index(drop=True)
    acc_per_source = Counter(accepted["_source"])
    for idx, rep in enumerate(src_reports):
        rep["quarantined"] += bad_per_source[idx]
        rep["duplicates_removed"] = dup_per_source[idx]
        rep["accepted"] = acc_per_source[idx]
    read = sum(r["read"] for r in src_reports)
    report = {
        "read": read,
        "accepted": len(accepted),
        "quarantined": len(entries),
        "duplicates_removed": int(dup.sum()),
        "duplicates_across_splits": int(across.sum()),
        "quarantined_by_check": count_checks(entries),
        "invalid_fraction": round(len(entries) / read, 6) if read else 0.0,
        "sources": src_reports,
    }
    assert report["read"] == report["accepted"] + report["quarantined"] + report["duplicates_removed"], report
    return accepted, entries, report


def _failures(df: pd.DataFrame, bounds: dict[str, int]):
    """Contract failures of a split's working rows, by row: pairs against CanonicalPairs, unpaired rows against
    CanonicalUnpaired (an empty split is checked as pairs, so that its column types are too)."""
    is_pair = df["_kind"] != "unpaired"
    failures = pair_failures(df.loc[is_pair, PAIR_COLUMNS], **bounds) if is_pair.any() or df.empty else None
    if (~is_pair).any():
        extra = unpaired_failures(_as_unpaired(df.loc[~is_pair]), **bounds)
        failures = extra if failures is None else failures.merge(extra)
    return failures


def _as_unpaired(df: pd.DataFrame) -> pd.DataFrame:
    """Working rows of kind unpaired as canonical unpaired rows (UNPAIRED_COLUMNS), index kept."""
    return _typed(df.rename(columns={"pair_id": "row_id"})[UNPAIRED_COLUMNS].astype({"label": bool}))


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame``, its text columns typed as text when it is empty (a contract checks an empty table's types)."""
    if not frame.empty:
        return frame
    return frame.astype({c: "str" for c in frame.columns if c not in ("prompt", "label")})


def _gate(split: str, rep: dict[str, Any], cfg: DataConfig, quarantine_path: Path) -> None:
    """DataError when a split's invalid rows exceed what the config tolerates."""
    n, read = rep["quarantined"], rep["read"]
    if n == 0:
        return
    checks = ", ".join(f"{c} {k}" for c, k in sorted(rep["quarantined_by_check"].items(), key=lambda kv: -kv[1]))
    where = f"see the quarantine file {quarantine_path}"
    if cfg.on_invalid == "fail":
        raise DataError(f"data.on_invalid=fail and {n} of {read} rows of split '{split}' failed validation "
                        f"({checks}); {where}")
    if n / read > cfg.max_invalid_fraction:
        raise DataError(f"{n} of {read} rows ({n / read:.1%}) of split '{split}' failed validation, above "
                        f"data.max_invalid_fraction={cfg.max_invalid_fraction} ({checks}); {where}")


def ingest(data_cfg: DataConfig, *, root: Path, quarantine_path: Path, gate_source: SourceConfig | None = None,
           pinned_eval: pd.DataFrame | None = None, pinned_origin: str = "pinned",
           unpaired: bool = False) -> IngestResult:
    """Read, convert, validate and split every configured source (see the module docstring).

    ``gate_source``: the promotion gate's own pairs, read first as split ``gate``. ``pinned_eval``: canonical pairs
    that are the eval split (the eval split of the first registered run, stored with the champion; ``pinned_origin``
    names it in the report): they are taken first, never train, and ``data.eval`` sources are not read; held-out
    pairs of a hash split that are not among them are counted in ``left_out_by_max_pairs['eval']``.

    ``unpaired``: the objective trains on unpaired rows (``TrainConfig.is_unpaired``: KTO). Sources may then hold
    unpaired records (``trl_unpaired``; without it they are a DataError), which are validated against
    ``data_contracts.unpaired.CanonicalUnpaired`` and go through de-duplication, splits and caps like pairs (a row
    counts as one record); at the end the pairs of the training splits (``TRAINING_SPLITS``) are also split into two
    unpaired rows each (``dpo_data.unpaired.unpair``). ``IngestResult.pairs`` keeps every pair (the judge and the
    generation comparison read them), ``IngestResult.unpaired`` holds every unpaired row, and the pairs of the
    training splits are trained on only as unpaired rows. The gate set is always pairs.

    ``report``: ``splits`` (per configured split: ``read``, ``accepted``, ``quarantined``, ``duplicates_removed``,
    ``duplicates_across_splits``, ``quarantined_by_check``, ``invalid_fraction``, ``sources`` with per-source counts,
    detected formats and per-file ``files`` (format, records, sha256, modified)), ``pairs`` (pairs per split in the
    result), ``left_out_by_max_pairs`` (per split), ``eval_split`` (``sources``, ``hash`` or ``pinned``),
    ``validation_fraction``, ``select`` (the train selection rule and the arrival times of the oldest and newest train
    pair), totals ``read``/``accepted``/``quarantined``/``duplicates_removed``, ``quarantine_file``, ``fingerprint``,
    ``train_fingerprint`` and ``gate_set_id`` (`pair_set_id` of split ``gate``, None without one); with
    ``unpaired``, ``unpaired`` (unpaired records per split in the result, like ``pairs``) and
    ``unpaired_from_pairs`` (rows made from the training splits' pairs). Hashed eval and validation pairs are counted in
    ``splits.train``.
    """
    root = Path(root)
    quarantine_path = Path(quarantine_path)
    groups: list[tuple[str, list[SourceConfig], int | None]] = []
    if gate_source is not None:
        groups.append((GATE_SPLIT, [gate_source], None))
    groups.append(("train", data_cfg.train, data_cfg.max_train_pairs))
    if not data_cfg.train:
        raise DataError("data.train lists no sources")
    if data_cfg.eval is not None and pinned_eval is None:
        if not data_cfg.eval:
            raise DataError("data.eval is an empty list: give eval sources, or null to split train by hash")
        groups.append(("eval", data_cfg.eval, data_cfg.max_eval_pairs))
    for name, src in data_cfg.extra_eval.items():
        if name in {"train", "eval", VALIDATION_SPLIT, GATE_SPLIT} or not name.strip():
            raise DataError(f"data.extra_eval set name '{name}' is reserved or blank; pick another name")
        groups.append((name, [src], data_cfg.max_extra_eval_pairs))
    bounds = {"min_chars": data_cfg.min_chars, "max_prompt_chars": data_cfg.max_prompt_chars,
              "max_response_chars": data_cfg.max_response_chars}

    taken: set[str] = set()
    entries: list[QuarantineEntry] = []
    split_reports: dict[str, dict[str, Any]] = {}
    frames: dict[str, pd.DataFrame] = {}
    pinned = _pinned(pinned_eval, bounds) if pinned_eval is not None else None
    if pinned is not None:
        taken.update(pinned["pair_id"])
    for split, sources, _ in groups:
        accepted, split_entries, rep = _ingest_split(split, sources, root, bounds, taken,
                                                     unpaired and split != GATE_SPLIT)
        taken.update(accepted["pair_id"])
        entries += split_entries
        split_reports[split] = rep
        frames[split] = accepted[_ROW_COLUMNS + _ARRIVAL_ORDER]
    write_quarantine(entries, quarantine_path)
    for split, rep in split_reports.items():
        _gate(split, rep, data_cfg, quarantine_path)

    caps = {split: cap for split, _, cap in groups}
    if data_cfg.eval is None:
        frames = _carve(frames, "eval", data_cfg.eval_fraction)
        caps["eval"] = data_cfg.max_eval_pairs
    left_out: dict[str, int] = {}
    if pinned is not None:  # the pinned pairs are the eval split; other held-out pairs stay out of training unused
        left_out["eval"] = len(frames.get("eval", ()))
        frames = {**frames, "eval": pinned}
        caps["eval"] = None
        n = len(pinned)
        split_reports["eval"] = {
            "read": n, "accepted": n, "quarantined": 0, "duplicates_removed": 0, "duplicates_across_splits": 0,
            "quarantined_by_check": {}, "invalid_fraction": 0.0,
            "sources": [{"name": pinned_origin, "path": pinned_origin, "formats": {}, "files": {}, "read": n,
                         "quarantined": 0, "duplicates_removed": 0, "accepted": n}],
        }
    if data_cfg.validation_fraction > 0:  # before the caps: max_train_pairs never changes the validation set
        frames = _carve(frames, VALIDATION_SPLIT, data_cfg.validation_fraction)
        caps[VALIDATION_SPLIT] = data_cfg.max_validation_pairs
    if GATE_SPLIT in frames:  # the gate split goes last in the table (it was read first)
        frames[GATE_SPLIT] = frames.pop(GATE_SPLIT)
    for split, frame in frames.items():
        cap = caps.get(split)
        left_out[split] = left_out.get(split, 0) + (max(0, len(frame) - cap) if cap is not None else 0)
        if split == "train" and data_cfg.select == "newest":
            ordered = frame.sort_values(_ARRIVAL_ORDER, kind="stable")
            frames[split] = ordered.tail(cap) if cap is not None else ordered
        else:
            frames[split] = frame.head(cap) if cap is not None else frame
    train = frames["train"]
    select = {"rule": data_cfg.select,
              "oldest_arrival": _iso(train["_arrival"].min()) if len(train) else None,
              "newest_arrival": _iso(train["_arrival"].max()) if len(train) else None}
    rows = pd.concat(list(frames.values()), ignore_index=True)
    is_pair = rows["_kind"] != "unpaired"
    pairs = _typed(rows.loc[is_pair, PAIR_COLUMNS].reset_index(drop=True))
    validate_pairs(pairs, **bounds)
    unpaired_rows = _as_unpaired(rows.loc[~is_pair]).reset_index(drop=True)
    converted = unpair(pairs[pairs["split"].isin(TRAINING_SPLITS)] if unpaired else pairs.head(0))
    if unpaired:  # the training splits' pairs as two unpaired rows each, after the split's own unpaired rows
        unpaired_rows = pd.concat([unpaired_rows, converted], ignore_index=True).drop_duplicates("row_id")
    validate_unpaired(unpaired_rows, **bounds)
    both = pd.concat([pairs[["split", "pair_id"]],
                      unpaired_rows[["split", "row_id"]].rename(columns={"row_id": "pair_id"})], ignore_index=True)
    fingerprint = pairs_fingerprint(both)
    train_ids = (unpaired_rows.loc[unpaired_rows["split"] == "train", "row_id"] if unpaired
                 else train.loc[train["_kind"] != "unpaired", "pair_id"])
    train_fingerprint = pair_set_id(train_ids)
    report = {
        "splits": split_reports,
        "pairs": {split: int((frame["_kind"] != "unpaired").sum()) for split, frame in frames.items()},
        **({"unpaired": {split: int((frame["_kind"] == "unpaired").sum()) for split, frame in frames.items()},
            "unpaired_from_pairs": {split: int((converted["split"] == split).sum()) for split in TRAINING_SPLITS
                                    if split in frames}} if unpaired else {}),
        "left_out_by_max_pairs": left_out,
        "eval_split": "pinned" if pinned is not None else "sources" if data_cfg.eval is not None else "hash",
        "validation_fraction": data_cfg.validation_fraction,
        "select": select,
        "read": sum(r["read"] for r in split_reports.values()),
        "accepted": sum(r["accepted"] for r in split_reports.values()),
        "quarantined": sum(r["quarantined"] for r in split_reports.values()),
        "duplicates_removed": sum(r["duplicates_removed"] for r in split_reports.values()),
        "quarantine_file": str(quarantine_path),
        "fingerprint": fingerprint,
        "train_fingerprint": train_fingerprint,
        "gate_set_id": pair_set_id(frames[GATE_SPLIT]["pair_id"]) if GATE_SPLIT in frames else None,
    }
    return IngestResult(pairs=pairs, report=report, fingerprint=fingerprint, quarantine_path=quarantine_path,
                        train_fingerprint=train_fingerprint, unpaired=unpaired_rows)


def _pinned(pairs: pd.DataFrame, bounds: dict[str, int]) -> pd.DataFrame:
    """Canonical pinned pairs as split ``eval``, validated, with arrival columns (unused: never capped)."""
    missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
    if missing:
        raise ContractError("pinned eval pairs", {f"missing_column_{c}": 1 for c in missing})
    frame = pairs[PAIR_COLUMNS].assign(split="eval").reset_index(drop=True)
    validate_pairs(frame, **bounds)
    return frame.assign(completion=None, label=None, _kind="pair", _arrival=0.0, _file="", _row=range(len(frame)))


def _carve(frames: dict[str, pd.DataFrame], split: str, fraction: float) -> dict[str, pd.DataFrame]:
    """Move the train pairs that `in_hashed_split` puts in `split` there (train keeps the rest, in file order)."""
    train = frames["train"]
    held = train["pair_id"].map(lambda pid: in_hashed_split(pid, fraction, split)).astype(bool)
    return {"train": train.loc[~held], split: train.loc[held].assign(split=split),
            **{k: v for k, v in frames.items() if k != "train"}}


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The ingest report flattened to one row per configured split (for a Prefect table artifact / MLflow table):
    split, read, accepted, quarantined, duplicates_removed, pairs used, left out by max_*_pairs, checks failed; and
    with an unpaired objective the unpaired rows used (its own unpaired records plus two per pair of a training
    split)."""
    rows = []

    def unpaired(split: str) -> dict[str, int]:
        if "unpaired" not in report:
            return {}
        return {"unpaired_rows": report["unpaired"].get(split, 0) + report["unpaired_from_pairs"].get(split, 0)}

    for split, rep in report["splits"].items():
        rows.append({
            "split": split,
            "read": rep["read"],
            "accepted": rep["accepted"],
            "quarantined": rep["quarantined"],
            "duplicates_removed": rep["duplicates_removed"],
            "pairs": report["pairs"].get(split, 0),
            **unpaired(split),
            "left_out_by_max_pairs": report["left_out_by_max_pairs"].get(split, 0),
            "quarantined_by_check": ", ".join(f"{c} {n}" for c, n in rep["quarantined_by_check"].items()) or "-",
        })
    hashed = [split for split in ("eval", VALIDATION_SPLIT)
              if split in report["pairs"] and split not in report["splits"]]
    for split in hashed:  # the hashed splits have no sources of their own
        rows.append({"split": split, "read": 0, "accepted": 0, "quarantined": 0, "duplicates_removed": 0,
                     "pairs": report["pairs"].get(split, 0), **unpaired(split),
                     "left_out_by_max_pairs": report["left_out_by_max_pairs"].get(split, 0),
                     "quarantined_by_check": "(hashed from train)"})
    return rows


# --------------------------------------------------------------------------------------------------- parquet


def write_pairs(df: pd.DataFrame, path: Path) -> Path:
    """Write a canonical-pairs table to Parquet atomically (prompt as list<struct<role, content>>)."""
    missing = [c for c in PAIR_COLUMNS if c not in df.columns]
    if missing:
        raise ContractError("canonical pairs", {f"missing_column_{c}": 1 for c in missing})
    records = {
        c: (list(df[c]) if c != "prompt" else [[{"role": m["role"], "content": m["content"]} for m in p]
                                              for p in df[c]])
        for c in PAIR_COLUMNS
    }
    table = pa.Table.from_pydict(records, schema=_ARROW_SCHEMA)
    path = Path(path)
    if path.exists() and not path.is_file():
        raise DataError(f"cannot write pairs to {path}: it exists and is not a regular file")
    with atomic_file(path, "wb") as handle:
        pq.write_table(table, handle)
    return path


def write_unpaired(df: pd.DataFrame, path: Path) -> Path:
    """Write a canonical unpaired table to Parquet atomically (prompt as list<struct<role, content>>)."""
    missing = [c for c in UNPAIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ContractError("canonical unpaired rows", {f"missing_column_{c}": 1 for c in missing})
    records = {c: (list(df[c]) if c != "prompt" else [[{"role": m["role"], "content": m["content"]} for m in p]
                                                     for p in df[c]]) for c in UNPAIRED_COLUMNS}
    records["label"] = [bool(v) for v in records["label"]]
    table = pa.Table.from_pydict(records, schema=_UNPAIRED_ARROW_SCHEMA)
    with atomic_file(Path(path), "wb") as handle:
        pq.write_table(table, handle)
    return Path(path)


def read_unpaired(path: Path) -> pd.DataFrame:
    """Read a table written by write_unpaired; ``prompt`` comes back as python lists of {role, content} dicts."""
    table = pq.read_table(path)
    data = {c: table.column(c).to_pylist() for c in UNPAIRED_COLUMNS}
    return pd.DataFrame(data, columns=UNPAIRED_COLUMNS).astype({"label": bool})


def read_pairs(path: Path) -> pd.DataFrame:
    """Read a table written by write_pairs; ``prompt`` comes back as python lists of {role, content} dicts."""
    table = pq.read_table(path)
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise ContractError(f"canonical pairs in {path}", {f"missing_column_{c}": 1 for c in missing})
    data = {c: table.column(c).to_pylist() for c in PAIR_COLUMNS}
    return pd.DataFrame(data, columns=PAIR_COLUMNS)
