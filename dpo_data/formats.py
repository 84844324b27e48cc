"""Preference-data formats: readers for every file kind and adapters from every format to canonical pairs.

Two jobs, kept apart:

* **Readers** turn a source (a file, a folder of files, a ``datasets.save_to_disk`` folder, or a hub dataset id when
  online) into :class:`RawRecord` s, one per record, each knowing its file and its line/row. A record that cannot be
  read (malformed JSON line, invalid UTF-8, a JSON value that is not an object, a CSV row with extra cells) is still
  yielded, with ``error`` set, so the caller can quarantine it: nothing is dropped here. Whole-file problems (the
  file does not exist, an unknown extension, a JSON array that does not parse) raise :class:`FormatError` with a
  one-line message. Blank lines of line-oriented files are not records and are skipped.
* **Adapters** turn one record of a known format into a :class:`CanonicalRecord` (prompt messages, chosen text,
  rejected text, the remaining fields as ``meta``), or for the unpaired format an :class:`UnpairedRecord` (prompt
  messages, completion text, label, ``meta``), or raise :class:`RecordError` with a short reason code
  (``missing_field``, ``wrong_type``, ``bad_label``, ``hh_prompt_mismatch``, ...). Content checks (blank text,
  chosen == rejected, role order, lengths) are *not* done here: they belong to the pandera contracts
  ``data_contracts.pairs.CanonicalPairs`` and ``data_contracts.unpaired.CanonicalUnpaired``, so there is one place
  that defines a valid pair and one that defines a valid unpaired row.

Formats (``SourceConfig.format``; ``auto`` detects per file from the first records' keys):

=================  =========================================================================================
``trl``            ``prompt``, ``chosen``, ``rejected`` strings (UltraFeedback binarized); or conversational:
                   ``prompt`` a list of messages, ``chosen``/``rejected`` lists with one assistant message;
                   or implicit prompt: no ``prompt``, ``chosen``/``rejected`` whole conversations sharing a prefix.
``align_anything`` ``question``, ``response_1``, ``response_2``, ``overall_response`` (1 or 2, int or string).
``pku_saferlhf``   ``prompt``, ``response_0``, ``response_1``, ``better_response_id`` (0 or 1).
``hh_rlhf``        ``chosen``/``rejected`` whole ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` transcripts; the prompt
                   is everything before the last assistant turn and must be the same on both sides.
``sharegpt``       ``conversations`` [{from: human|gpt|system, value}] (or {role, content}), ``chosen`` and
                   ``rejected`` {from, value} (or plain strings), optional ``system`` string (LLaMA-Factory).
``trl_unpaired``   TRL's unpaired preference (KTO): ``prompt``, ``completion`` strings and a boolean ``label``
                   (True: desirable); or conversational: ``prompt`` a list of messages, ``completion`` a list
                   with one assistant message; or implicit prompt: no ``prompt``, ``completion`` a whole
                   conversation. A label that is not a JSON/Parquet boolean is ``bad_label``.
=================  =========================================================================================

``fields`` (``SourceConfig.fields``) maps a format's canonical field names to the file's own names, e.g.
``{"prompt": "instruction"}``. This module imports no pandera/prefect/mlflow: it is plain pandas/json/pyarrow.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_core.config import FORMAT_NAMES, UserError

__all__ = [
    "FORMATS",
    "FORMAT_FIELDS",
    "FILE_KINDS",
    "FormatError",
    "RecordError",
    "RawRecord",
    "CanonicalRecord",
    "UnpairedRecord",
    "file_kind",
    "list_data_files",
    "locate_source",
    "read_records",
    "iter_file_records",
    "detect_format",
    "detect_file_format",
    "check_fields",
    "to_canonical",
    "parse_hh_transcript",
    "make_pair_id",
    "make_row_id",
    "json_safe",
]

# canonical field names of each format (the keys `fields` may rename)
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "trl": ("prompt", "chosen", "rejected"),
    "align_anything": ("question", "response_1", "response_2", "overall_response"),
    "pku_saferlhf": ("prompt", "response_0", "response_1", "better_response_id"),
    "hh_rlhf": ("chosen", "rejected"),
    "sharegpt": ("conversations", "chosen", "rejected", "system"),
    "trl_unpaired": ("prompt", "completion", "label"),
}
FORMATS = FORMAT_NAMES
# file kind by (compound) suffix; checked longest first
FILE_KINDS: dict[str, str] = {
    ".jsonl.gz": "jsonl",
    ".json.gz": "json",
    ".csv.gz": "csv",
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_BOM = b"\xef\xbb\xbf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_DETECT_LOOKAHEAD = 50


class FormatError(UserError):
    """A source cannot be read at all (missing, unknown kind, unparseable file, offline hub id): one-line message."""


class RecordError(ValueError):
    """One record cannot be converted to a canonical pair; ``reason`` is a short code used as the quarantine check."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RawRecord:
    """One record as read from a file. ``row`` is its 0-based index among the file's records, ``line`` the 1-based
    line where it starts (line-oriented files only). When it could not be read, ``record`` is None, ``error`` is the
    reason code and ``raw`` holds the text as far as it could be decoded."""

    file: str
    row: int
    line: int | None = None
    record: dict[str, Any] | None = None
    raw: str | None = None
    error: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class CanonicalRecord:
    """A record in canonical form: ``prompt`` chat messages (ends with a user turn), the two assistant texts, and
    every field the adapter did not consume in ``meta``."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UnpairedRecord:
    """An unpaired record in canonical form: ``prompt`` chat messages (ends with a user turn), one assistant
    ``completion`` and its ``label`` (True: desirable, False: undesirable), every other field in ``meta``."""

    prompt: list[dict[str, str]]
    completion: str
    label: bool
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- readers


def file_kind(path: Path | str) -> str | None:
    """``jsonl`` / ``json`` / ``parquet`` / ``csv`` from the (compound) suffix, or None for anything else."""
    name = Path(path).name.lower()
    for suffix, kind in FILE_KINDS.items():
        if name.endswith(suffix):
            return kind
    return None


def list_data_files(folder: Path) -> list[Path]:
    """All data files under ``folder`` (recursively, hidden entries skipped), sorted by relative path."""
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file()
        and file_kind(p) is not None
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _is_save_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()
    )


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def locate_source(path: str, *, root: Path) -> Path | None:
    """The local file or folder a source ``path`` names (relative to ``root`` unless absolute), or None for a hub
    dataset id (only when online); checked without reading any record. FormatError when it is none of these."""
    local = Path(path) if Path(path).is_absolute() else root / path
    if local.is_dir():
        if not _is_save_to_disk(local) and not list_data_files(local):
            raise FormatError(
                f"folder {local} holds no data files (expected {', '.join(FILE_KINDS)} or a save_to_disk folder)"
            )
        return local
    if local.is_file():
        return local
    if file_kind(path) is None and _HUB_ID.match(path) and "/" in path:
        if _hub_offline():
            raise FormatError(
                f"data source '{path}' is not a local file or folder (looked in {local}) and the hub is offline "
                f"(HF_HUB_OFFLINE=1): copy the dataset under data/ or unset HF_HUB_OFFLINE"
            )
        return None
    raise FormatError(f"data file not found: {local}")


def read_records(path: str, *, root: Path, split: str | None = None) -> Iterator[RawRecord]:
    """Every record of a source: a data file, a folder (all its data files, sorted), a ``save_to_disk`` folder, or a
    hub dataset id (only when online). ``path`` is relative to ``root`` unless absolute. Raises FormatError for a
    source that cannot be read at all (see ``locate_source``); yields unreadable records with ``error`` set."""
    local = locate_source(path, root=root)
    if local is None:
        yield from _iter_hub(path, split)
    elif local.is_dir() and _is_save_to_disk(local):
        yield from _iter_save_to_disk(local, split)
    elif local.is_dir():
        for f in list_data_files(local):
            yield from iter_file_records(f)
    else:
        yield from iter_file_records(local)


def iter_file_records(path: Path) -> Iterator[RawRecord]:
    """The records of one data file, by kind (see FILE_KINDS); FormatError for an unknown extension."""
    kind = file_kind(path)
    if kind is None:
        raise FormatError(
            f"unsupported data file kind '{''.join(path.suffixes) or path.name}' for {path}; "
            f"expected one of {', '.join(FILE_KINDS)}"
        )
    reader = {"jsonl": _iter_jsonl, "json": _iter_json, "parquet": _iter_parquet, "csv": _iter_csv}[kind]
    try:
        yield from reader(path)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:  # truncated gzip, unreadable file, broken parquet
        raise FormatError(f"cannot read {path}: {type(exc).__name__}: {_first_line(exc)}") from exc


def _open_bytes(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _parse_json_record(text: str) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(record, error, detail) for one JSON text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, "malformed_json", f"{exc.msg} at column {exc.colno}"
    except RecursionError:
        return None, "malformed_json", "nesting too deep"
    if not isinstance(value, dict):
        return None, "not_an_object", f"a JSON {type(value).__name__}, expected an object"
    return value, None, None


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    name = str(path)
    row = 0
    with _open_bytes(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if lineno == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            if not line.strip():
                continue  # a blank line is not a record
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRecord(name, row, lineno, raw=line.decode("utf-8", "replace").rstrip("\r\n"),
                                error="invalid_utf8", detail=f"byte {exc.start}: {exc.reason}")
                row += 1
                continue
            record, error, detail = _parse_json_record(text)
            yield RawRecord(name, row, lineno, record=record, raw=None if record is not None else text.rstrip("\r\n"),
                            error=error, detail=detail)
            row += 1


def _has_surrogates(value: Any) -> bool:
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


def _unsurrogate(value: Any) -> Any:
    """Replace undecodable bytes (kept as surrogates) by U+FFFD, for a quarantine entry that is valid UTF-8."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_unsurrogate(k): _unsurrogate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unsurrogate(v) for v in value]
    return value


def _refuse_single_object(path: Path, text: str) -> None:
    """FormatError for a pretty-printed JSON object (e.g. ``{"data": [...]}``), which is neither an array of records
    nor JSON Lines: read line by line it would only give malformed lines."""
    first = text.lstrip().split("\n", 1)[0]
    try:
        json.loads(first)
        return  # the first line is a whole JSON value: JSON Lines
    except json.JSONDecodeError:
        pass
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return  # not one document either: read as lines, each bad line is quarantined with its reason
    if isinstance(value, dict):
        raise FormatError(f"{path} holds one JSON object (keys: {sorted(value)[:8]}), not an array of records or "
                          "JSON Lines; convert it to a list of records")


def _iter_json(path: Path) -> Iterator[RawRecord]:
    with _open_bytes(path) as fh:
        data = fh.read()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    text = data.decode("utf-8", "surrogateescape")  # bad bytes are isolated per record below
    if not text.lstrip().startswith("["):
        _refuse_single_object(path, text)
        # many `.json` files are really JSON Lines
        yield from _iter_jsonl(path)
        return
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    name = str(path)
    for row, value in enumerate(values):
        if not isinstance(value, dict):
            yield RawRecord(name, row, raw=json.dumps(_unsurrogate(value), default=str)[:10_000],
                            error="not_an_object", detail=f"a JSON {type(value).__name__}, expected an object")
        elif _has_surrogates(value):
            yield RawRecord(name, row, raw=json.dumps(_unsurrogate(value), ensure_ascii=False),
                            error="invalid_utf8", detail="the record holds bytes that are not valid UTF-8")
        else:
            yield RawRecord(name, row, record=value)


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise FormatError(f"{path} is not a readable Parquet file: {_first_line(exc)}") from exc
    row = 0
    batches = pf.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except pa.ArrowException as exc:  # a corrupt row group
            raise FormatError(f"cannot read {path} after row {row}: {_first_line(exc)}") from exc
        for value in batch.to_pylist():
            yield RawRecord(str(path), row, record=value)
            row += 1


def _iter_csv(path: Path) -> Iterator[RawRecord]:
    with _open_bytes(path) as fh:
        data = fh.read()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    text = data.decode("utf-8", "surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="__extra_cells__")
    if reader.fieldnames is None:
        return
    name = str(path)
    row = 0
    start = reader.line_num + 1
    for rec in reader:
        line = start
        start = reader.line_num + 1
        if "__extra_cells__" in rec:
            yield RawRecord(name, row, line, raw=json.dumps(_unsurrogate(rec), ensure_ascii=False),
                            error="malformed_csv", detail=f"{len(rec['__extra_cells__'])} more cells than the header")
        elif _has_surrogates(rec):
            yield RawRecord(name, row, line, raw=json.dumps(_unsurrogate(rec), ensure_ascii=False),
                            error="invalid_utf8", detail="the row holds bytes that are not valid UTF-8")
        else:
            yield RawRecord(name, row, line, record=dict(rec))  # missing cells are None -> missing_field
        row += 1


def _iter_dataset(ds: Any, name: str) -> Iterator[RawRecord]:
    for row, value in enumerate(ds):
        yield RawRecord(name, row, record=dict(value))


def _iter_save_to_disk(folder: Path, split: str | None) -> Iterator[RawRecord]:
    import datasets

    obj = datasets.load_from_disk(str(folder))
    if isinstance(obj, datasets.DatasetDict):
        splits = list(obj)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in obj:
            raise FormatError(
                f"save_to_disk folder {folder} holds splits {splits}: set `split:` on the source to one of them"
            )
        yield from _iter_dataset(obj[split], f"{folder}[{split}]")
    else:
        yield from _iter_dataset(obj, str(folder))


def _iter_hub(dataset_id: str, split: str | None) -> Iterator[RawRecord]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear line
        raise FormatError(f"cannot load hub dataset '{dataset_id}': {type(exc).__name__}: {_first_line(exc)}") from exc
    yield from _iter_dataset(ds, f"hub:{dataset_id}[{split or 'train'}]")


# --------------------------------------------------------------------------------------------------- adapters


def check_fields(fmt: str, fields: Mapping[str, str]) -> None:
    """FormatError when ``fields`` renames a field the format does not have (a typo would otherwise be silent)."""
    if fmt == "auto":
        known = {f for names in FORMAT_FIELDS.values() for f in names}
    else:
        if fmt not in FORMAT_FIELDS:
            raise FormatError(f"unknown data format '{fmt}'; expected auto or one of {', '.join(FORMATS)}")
        known = set(FORMAT_FIELDS[fmt])
    unknown = sorted(set(fields) - known)
    if unknown:
        raise FormatError(
            f"`fields` renames {unknown}, which format '{fmt}' does not have; its fields are {sorted(known)}"
        )


def _key(name: str, fields: Mapping[str, str]) -> str:
    return fields.get(name, name)


def _looks_hh(value: Any) -> bool:
    return isinstance(value, str) and "\n\nHuman:" in value and "\n\nAssistant:" in value


def detect_format(record: Mapping[str, Any], fields: Mapping[str, str] | None = None) -> str | None:
    """The format whose fields ``record`` has (after renaming), or None."""
    f = fields or {}
    has = lambda name: _key(name, f) in record  # noqa: E731
    if has("conversations"):
        return "sharegpt"
    if has("completion") and has("label") and not has("chosen"):
        return "trl_unpaired"
    if has("question") and has("response_1") and has("response_2"):
        return "align_anything"
    if has("response_0") and has("response_1"):
        return "pku_saferlhf"
    if has("chosen") and has("rejected"):
        if has("prompt"):
            return "trl"
        chosen = record[_key("chosen", f)]
        if _looks_hh(chosen):
            return "hh_rlhf"
        if isinstance(chosen, list):
            return "trl"  # implicit prompt
    return None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _get(record: Mapping[str, Any], name: str, fields: Mapping[str, str]) -> Any:
    key = _key(name, fields)
    if key not in record:
        raise RecordError("missing_field", f"field '{key}' is missing")
    value = record[key]
    if _is_missing(value):
        raise RecordError("missing_field", f"field '{key}' is null")
    return value


def _text(record: Mapping[str, Any], name: str, fields: Mapping[str, str]) -> str:
    value = _get(record, name, fields)
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"field '{_key(name, fields)}' is {type(value).__name__}, expected text")
    return value


def _message(value: Any, where: str) -> dict[str, str]:
    """A {role, content} message from {role, content} or {from, value}; roles are passed through unchecked (the
    contract checks them) except ShareGPT's human/gpt names, which are mapped."""
    if not isinstance(value, dict):
        raise RecordError("wrong_type", f"{where} is {type(value).__name__}, expected a message object")
    if not set(value) & {"role", "content", "from", "value"}:
        raise RecordError("wrong_type", f"{where} is an object without role/content (or from/value) keys")
    if "role" in value or "content" in value:
        role, content = value.get("role"), value.get("content")
    else:
        role, content = value.get("from"), value.get("value")
    if _is_missing(role) or _is_missing(content):
        raise RecordError("missing_field", f"{where} lacks a role/content (or from/value)")
    if not isinstance(role, str) or not isinstance(content, str):
        raise RecordError("wrong_type", f"{where} has a non-text role or content")
    return {"role": _SHAREGPT_ROLES.get(role, role), "content": content}


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RecordError("wrong_type", f"{where} is {type(value).__name__}, expected a list of messages")
    return [_message(m, f"{where}[{i}]") for i, m in enumerate(value)]


def _assistant_text(value: Any, where: str) -> str:
    """A response given as text, one message object, or a list holding one assistant message."""
    if isinstance(value, str):
        return value
    msgs = _messages(value, where) if isinstance(value, list) else [_message(value, where)]
    if len(msgs) != 1:
        raise RecordError("unsupported_response", f"{where} holds {len(msgs)} messages, expected one assistant turn")
    if msgs[0]["role"] != "assistant":
        raise RecordError("bad_response_role", f"{where} has role '{msgs[0]['role']}', expected assistant")
    return msgs[0]["content"]


def _label(value: Any, allowed: tuple[int, ...], key: str) -> int:
    """An int label from an int, an integral float or a digit string; RecordError('bad_label') otherwise."""
    label: int | None = None
    if isinstance(value, bool):
        label = None
    elif isinstance(value, int):
        label = value
    elif isinstance(value, float) and value.is_integer():
        label = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        label = int(value.strip())
    if label not in allowed:
        raise RecordError("bad_label", f"field '{key}' is {value!r}; expected one of {list(allowed)} (no ties)")
    return label


def _meta(record: Mapping[str, Any], consumed: set[str]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in consumed}


def _trl(record: Mapping[str, Any], f: Mapping[str, str]) -> CanonicalRecord:
    consumed = {_key(n, f) for n in ("prompt", "chosen", "rejected")}
    chosen_raw = _get(record, "chosen", f)
    rejected_raw = _get(record, "rejected", f)
    if _key("prompt", f) not in record and isinstance(chosen_raw, list) and isinstance(rejected_raw, list):
        # implicit prompt: two whole conversations that share everything but the last assistant turn
        c, r = _messages(chosen_raw, "chosen"), _messages(rejected_raw, "rejected")
        if not c or not r:
            raise RecordError("missing_field", "chosen/rejected conversation is empty")
        if c[:-1] != r[:-1]:
            raise RecordError("prompt_mismatch", "chosen and rejected conversations differ before the last turn")
        return CanonicalRecord(c[:-1], _assistant_text(c[-1], "chosen[-1]"), _assistant_text(r[-1], "rejected[-1]"),
                               _meta(record, consumed))
    prompt = _prompt_messages(_get(record, "prompt", f), _key("prompt", f))
    return CanonicalRecord(prompt, _assistant_text(chosen_raw, "chosen"), _assistant_text(rejected_raw, "rejected"),
                           _meta(record, consumed))


def _wrong_type_if_not_text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"field '{key}' is {type(value).__name__}, expected text")
    return value


def _align_anything(record: Mapping[str, Any], f: Mapping[str, str]) -> CanonicalRecord:
    names = FORMAT_FIELDS["align_anything"]
    question = _text(record, "question", f)
    r1, r2 = _text(record, "response_1", f), _text(record, "response_2", f)
    better = _label(_get(record, "overall_response", f), (1, 2), _key("overall_response", f))
    chosen, rejected = (r1, r2) if better == 1 else (r2, r1)
    return CanonicalRecord([{"role": "user", "content": question}], chosen, rejected,
                           _meta(record, {_key(n, f) for n in names}))


def _pku(record: Mapping[str, Any], f: Mapping[str, str]) -> CanonicalRecord:
    names = FORMAT_FIELDS["pku_saferlhf"]
    prompt = _text(record, "prompt", f)
    r0, r1 = _text(record, "response_0", f), _text(record, "response_1", f)
    better = _label(_get(record, "better_response_id", f), (0, 1), _key("better_response_id", f))
    chosen, rejected = (r0, r1) if better == 0 else (r1, r0)
    return CanonicalRecord([{"role": "user", "content": prompt}], chosen, rejected,
                           _meta(record, {_key(n, f) for n in names}))


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> [{user, a}, {assistant, b}]. Only ``\\n\\nHuman:`` and
    ``\\n\\nAssistant:`` start a turn (as upstream defines); turn texts are stripped. RecordError when the text does
    not start with a turn marker."""
    parts = _HH_MARKER.split(text)
    # parts = [before, role1, text1, role2, text2, ...]
    if parts[0].strip() or len(parts) < 3:
        raise RecordError("hh_malformed_transcript", "text does not start with '\\n\\nHuman:' / '\\n\\nAssistant:'")
    return [
        {"role": "user" if role == "Human" else "assistant", "content": body.strip()}
        for role, body in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _hh_split(text: str, side: str) -> tuple[list[dict[str, str]], str]:
    turns = parse_hh_transcript(text)
    if turns[-1]["role"] != "assistant":
        raise RecordError("hh_malformed_transcript", f"{side} transcript does not end with an assistant turn")
    return turns[:-1], turns[-1]["content"]


def _hh(record: Mapping[str, Any], f: Mapping[str, str]) -> CanonicalRecord:
    chosen_text, rejected_text = _text(record, "chosen", f), _text(record, "rejected", f)
    c_prompt, chosen = _hh_split(chosen_text, "chosen")
    r_prompt, rejected = _hh_split(rejected_text, "rejected")
    if c_prompt != r_prompt:
        raise RecordError("hh_prompt_mismatch", "chosen and rejected transcripts differ before the last assistant turn")
    return CanonicalRecord(c_prompt, chosen, rejected, _meta(record, {_key("chosen", f), _key("rejected", f)}))


def _sharegpt(record: Mapping[str, Any], f: Mapping[str, str]) -> CanonicalRecord:
    prompt = _messages(_get(record, "conversations", f), _key("conversations", f))
    system_key = _key("system", f)
    system = record.get(system_key)
    if not _is_missing(system) and system != "":
        prompt = [{"role": "system", "content": _wrong_type_if_not_text(system, system_key)}, *prompt]
    chosen = _assistant_text(_get(record, "chosen", f), _key("chosen", f))
    rejected = _assistant_text(_get(record, "rejected", f), _key("rejected", f))
    consumed = {_key(n, f) for n in FORMAT_FIELDS["sharegpt"]}
    return CanonicalRecord(prompt, chosen, rejected, _meta(record, consumed))


def _prompt_messages(prompt_raw: Any, key: str) -> list[dict[str, str]]:
    """A prompt given as text (one user message) or as a list of messages."""
    if isinstance(prompt_raw, str):
        return [{"role": "user", "content": prompt_raw}]
    if isinstance(prompt_raw, list):
        return _messages(prompt_raw, "prompt")
    raise RecordError("wrong_type",
                      f"field '{key}' is {type(prompt_raw).__name__}, expected text or a list of messages")


def _trl_unpaired(record: Mapping[str, Any], f: Mapping[str, str]) -> UnpairedRecord:
    consumed = {_key(n, f) for n in FORMAT_FIELDS["trl_unpaired"]}
    label_key = _key("label", f)
    label = _get(record, "label", f)
    if hasattr(label, "item") and not isinstance(label, (list, dict)):  # a numpy bool from Parquet
        label = label.item()
    if not isinstance(label, bool):
        raise RecordError("bad_label", f"field '{label_key}' is {label!r}; expected a boolean (true: desirable)")
    completion_raw = _get(record, "completion", f)
    if _key("prompt", f) not in record and isinstance(completion_raw, list):
        # implicit prompt: the whole conversation, its last turn the completion
        turns = _messages(completion_raw, "completion")
        if len(turns) < 2:
            raise RecordError("missing_field", "completion conversation has no prompt before its last turn")
        return UnpairedRecord(turns[:-1], _assistant_text(turns[-1], "completion[-1]"), label,
                              _meta(record, consumed))
    prompt = _prompt_messages(_get(record, "prompt", f), _key("prompt", f))
    return UnpairedRecord(prompt, _assistant_text(completion_raw, "completion"), label, _meta(record, consumed))


_ADAPTERS = {"trl": _trl, "align_anything": _align_anything, "pku_saferlhf": _pku, "hh_rlhf": _hh,
             "sharegpt": _sharegpt, "trl_unpaired": _trl_unpaired}


def to_canonical(record: Mapping[str, Any], fmt: str,
                 fields: Mapping[str, str] | None = None) -> CanonicalRecord | UnpairedRecord:
    """Convert one record of format ``fmt`` (not ``auto``) to a CanonicalRecord (an UnpairedRecord for
    ``trl_unpaired``); RecordError with a reason code."""
    if fmt not in _ADAPTERS:
        raise FormatError(f"unknown data format '{fmt}'; expected one of {', '.join(FORMATS)}")
    return _ADAPTERS[fmt](record, fields or {})


def detect_file_format(records: list[RawRecord], fields: Mapping[str, str], file: str) -> str:
    """Auto-detect the format of one file from its first readable records (FormatError if none matches)."""
    seen = 0
    first_keys: list[str] | None = None
    for rec in records:
        if rec.record is None:
            continue
        fmt = detect_format(rec.record, fields)
        if fmt is not None:
            return fmt
        first_keys = first_keys or sorted(rec.record)
        seen += 1
        if seen >= _DETECT_LOOKAHEAD:
            break
    raise FormatError(
        f"cannot detect the preference format of {file} (first record keys: {first_keys}); set `format:` to one of "
        f"{', '.join(FORMATS)} and `fields:` to rename its columns"
    )


# --------------------------------------------------------------------------------------------------- ids


def json_safe(value: Any) -> Any:
    """A JSON-serialisable copy: non-finite floats become None, numpy scalars/arrays and bytes become plain values."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "tolist"):  # numpy array / scalar
        return json_safe(value.tolist())
    return str(value)


def make_pair_id(prompt: list[dict[str, str]], chosen: str, rejected: str) -> str:
    """Stable content hash of a pair: sha256 of the canonical JSON of (prompt messages, chosen, rejected), 16 hex."""
    payload = {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
               "chosen": chosen, "rejected": rejected}
    return _content_hash(payload)


def make_row_id(prompt: list[dict[str, str]], completion: str, label: bool) -> str:
    """Stable content hash of an unpaired row: sha256 of the canonical JSON of (prompt messages, completion,
    label), 16 hex (the same completion with the other label is another row)."""
    payload = {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
               "completion": completion, "label": bool(label)}
    return _content_hash(payload)


def _content_hash(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]
