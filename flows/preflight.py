"""What can be checked before the first stage: the config loads, the model and the data exist, the device is there.

`python -m flows.dpo` runs these before Prefect starts, and the `dpo` flow runs them again first thing (a deployment
run has no CLI in front of it). Every problem is a `dpo_core.config.UserError` whose message is one line saying what
to fix; all problems found are reported together.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dpo_core.config import RunConfig, SourceConfig, UserError, load_config
from dpo_core.judges import locate_judge
from dpo_core.models import check_device, locate_model
from dpo_data.formats import check_fields, locate_source
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


def preflight(cfg: RunConfig) -> None:
    """UserError naming every problem found: the model path, the device, the judge's model folder (when generations
    are compared), each data source's path and field renames.

    Reads no records and loads no model (the embedded model is materialised by the first stage)."""
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
    for where, src in _sources(cfg):
        try:
            check_fields(src.format, src.fields)
            locate_source(src.path, root=root)
        except UserError as exc:
            problems.append(f"{where}: {one_line(str(exc))}")
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
