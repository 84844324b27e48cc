"""What can be checked before the first stage: the config loads, the model and the data exist, the device is there,
and the data's kind (pairs, or unpaired rows) fits the objective.

`python -m flows.dpo` runs these before Prefect starts, and the `dpo` flow runs them again first thing (a deployment
run has no CLI in front of it). Every problem is a `dpo_core.config.UserError` whose message is one line saying what
to fix; all problems found are reported together.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dpo_core.config import UNPAIRED_FORMATS, RunConfig, SourceConfig, UserError, load_config
from dpo_core.judges import locate_judge
from dpo_core.models import check_device, locate_model
from dpo_data.formats import FormatError, check_fields, detect_file_format, locate_source, read_records
from tasks.ingest import data_root


def one_line(text: str) -> str:
    """`text` with its lines joined by spaces (a user error is printed as one line)."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def config_error_line(exc: BaseException) -> str:
    """One readable line for a config that does not load: pydantic errors as `section.key: message`."""
    if not isinstance(exc, ValidationError):
        return one_line(str(exc)) or type(exc).__name__
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        # a model-level check names its own fields (`train.label_smoothing=0.1 has no meaning ...`)
        parts.append(message if not where or message.startswith(f"{where}.") else f"{where}: {message}")
    return one_line("; ".join(parts))


def load_checked_config(config_path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """`load_config`, with a missing file, bad YAML or an invalid value raised as one UserError line."""
    try:
        return load_config(config_path, overrides or [])
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UserError(f"config {config_path or '(defaults)'}: {config_error_line(exc)}") from exc


def _sources(cfg: RunConfig) -> list[tuple[str, SourceConfig]]:
    named = [(f"data.train[{i}]", src) for i, src in enumerate(cfg.data.train)]
    named += [(f"data.eval[{i}]", src) for i, src in enumerate(cfg.data.eval or [])]
    named += [(f"data.extra_eval.{name}", src) for name, src in cfg.data.extra_eval.items()]
    named += [("registry.gate_set", cfg.registry.gate_set)] if cfg.registry.gate_set is not None else []
    return named


def _is_unpaired(src: SourceConfig, sample: int = 50) -> bool:
    """Whether a local source holds unpaired rows: its format, or with `auto` the format detected from the first
    readable records of its first file (False when none can be detected: ingest reports that)."""
    if src.format != "auto":
        return src.format in UNPAIRED_FORMATS
    records = list(itertools.islice(read_records(src.path, root=data_root(), split=src.split), sample))
    if not records:
        return False
    try:
        return detect_file_format([r for r in records if r.file == records[0].file], src.fields,
                                  records[0].file) in UNPAIRED_FORMATS
    except FormatError:
        return False


def _data_kind_problems(cfg: RunConfig, sources: list[tuple[str, SourceConfig]]) -> list[str]:
    """Unpaired sources where pairs are needed: for a pairwise objective anywhere, and with an unpaired objective
    (KTO) for the promotion gate, the generation comparison (held-out pairs) and a trained judge (train pairs)."""
    unpaired = {where: src.path for where, src in sources if _is_unpaired(src)}
    if not unpaired:
        return []
    where, path = next(iter(unpaired.items()))
    if not cfg.train.is_unpaired():
        return [f"{where}: {path} holds unpaired rows (prompt, completion, label); train.loss="
                f"{cfg.train.objective_name()} needs pairs: use train.loss=kto, or paired data"]
    problems = []
    if "registry.gate_set" in unpaired or (cfg.registry.enabled and cfg.registry.gate_set is None
                                           and any(w.startswith("data.eval[") for w in unpaired)):
        problems.append("the promotion gate scores pairs but its set (registry.gate_set, else data.eval) holds "
                        "unpaired rows: give a paired registry.gate_set, or set registry.enabled=false")
    if cfg.eval.n_generations > 0 and any(w.startswith("data.eval[") for w in unpaired):
        problems.append("the generation comparison answers the held-out pairs' prompts but data.eval holds unpaired "
                        "rows: give paired eval data (unpaired sets fit data.extra_eval) or set eval.n_generations=0")
    train = [w for w, _ in sources if w.startswith("data.train[")]
    if (cfg.eval.n_generations > 0 and cfg.eval.judge.kind == "bradley_terry"
            and all(w in unpaired for w in train)):
        problems.append("the bradley_terry judge trains on the train pairs but data.train holds unpaired rows only: "
                        "set eval.judge.kind=similarity or reward_model, or eval.n_generations=0")
    return problems


def preflight(cfg: RunConfig) -> None:
    """UserError naming every problem found: the model path, the device, the judge's model folder (when generations
    are compared), each data source's path and field renames, unpaired data where pairs are needed.

    Loads no model (the embedded model is materialised by the first stage) and reads only the first records of each
    local source whose format is `auto` (to tell pairs from unpaired rows)."""
    problems: list[str] = []
    checks = [(locate_model, cfg.model), (check_device, cfg.model)]
    if cfg.eval.n_generations > 0:
        checks.append((locate_judge, cfg.eval.judge))
    for check, section in checks:
        try:
            check(section)
        except UserError as exc:
            problems.append(one_line(str(exc)))
    root = data_root()
    local = []
    for where, src in _sources(cfg):
        try:
            check_fields(src.format, src.fields)
            if locate_source(src.path, root=root) is not None:
                local.append((where, src))
        except UserError as exc:
            problems.append(f"{where}: {one_line(str(exc))}")
    try:
        problems += _data_kind_problems(cfg, local)
    except UserError as exc:  # a source that cannot be read at all: ingest reports it too
        problems.append(one_line(str(exc)))
    if problems:
        raise UserError("; ".join(problems))


def cli_parser(prog: str, description: str, config_default: str, config_help: str, set_help: str,
               debug_help: str) -> argparse.ArgumentParser:
    """The flows' shared command line: `--config`, repeatable `--set KEY=VALUE` and `--debug`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=config_default, help=f"{config_help} (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    parser.add_argument("--debug", action="store_true", help=debug_help)
    return parser


def run_cli(run: Callable[[], Any], *, debug: bool) -> tuple[int, Any]:
    """`(0, run())`, or `(2, None)` after one `error: ...` line on stderr when `run` raises a UserError (with the
    traceback above it under `--debug`); any other exception is a bug and propagates with its traceback."""
    try:
        return 0, run()
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2, None
