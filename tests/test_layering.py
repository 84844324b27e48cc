"""The one-way import rule of docs/architecture.md, checked on every module of the repository (by parsing, as the
cache keys do): flows -> tasks -> (tracking, dpo_data) -> (dpo_core, data_contracts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.artifacts import PROJECT_PACKAGES, PROJECT_ROOT, _imported_names

# what each package may import from this repository (itself always)
ALLOWED = {
    "dpo_core": set(),
    "data_contracts": {"dpo_core.config"},
    "dpo_data": {"dpo_core", "data_contracts"},
    "tracking": {"dpo_core", "data_contracts", "dpo_data"},
    "tasks": {"dpo_core", "data_contracts", "dpo_data", "tracking"},
    "flows": {"dpo_core", "data_contracts", "dpo_data", "tracking", "tasks"},
}
# third-party packages a library layer must not import
FORBIDDEN_THIRD_PARTY = {"dpo_core": {"prefect", "mlflow"}, "data_contracts": {"prefect", "mlflow", "torch"},
                         "dpo_data": {"prefect", "mlflow"}, "tracking": {"prefect"}}


def _modules(package: str, root: Path) -> list[tuple[str, Path]]:
    return [(".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"), p)
            for p in sorted((root / package).rglob("*.py"))]


def _violations(package: str, root: Path = PROJECT_ROOT) -> set[str]:
    """`"<module> imports <name>"` for every import `package` may not make (one per imported module or name)."""
    bad = set()
    for name, path in _modules(package, root):
        for imported in _imported_names(name, path, path.read_bytes()):
            top = imported.split(".")[0]
            if top in PROJECT_PACKAGES and top != package:
                if not any(imported == a or imported.startswith(a + ".") or a.startswith(imported + ".")
                           for a in ALLOWED[package]):
                    bad.add(f"{name} imports {imported}")
            if top in FORBIDDEN_THIRD_PARTY.get(package, set()):
                bad.add(f"{name} imports {imported}")
    return bad


@pytest.mark.parametrize("package", PROJECT_PACKAGES)
def test_imports_point_one_way(package):
    assert set(PROJECT_PACKAGES) == set(ALLOWED)  # a new package needs its row here and in docs/architecture.md
    assert _violations(package) == set()


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule is not vacuous: an import inside a dpo_core function that reaches into tasks is reported."""
    (tmp_path / "dpo_core").mkdir()
    (tmp_path / "dpo_core" / "__init__.py").write_text("")
    (tmp_path / "dpo_core" / "bad.py").write_text("import torch\n\ndef f():\n    from tasks.train import train_stage\n")
    (tmp_path / "dpo_core" / "worse.py").write_text("import mlflow\n")
    assert {"dpo_core.bad imports tasks.train", "dpo_core.worse imports mlflow"} <= _violations("dpo_core", tmp_path)
    assert not any(v.startswith("dpo_core.bad imports torch") for v in _violations("dpo_core", tmp_path))
