"""Arrows point one way: cli -> pipelines -> calibrate/plan/profiles/presets -> engine/checkpoint/
convert -> formats -> codecs -> names/progress/digests/registry -> errors. Every import in quantcli/ (module
level or inside a function) is checked against these ranks; only cli/ may import typer or rich."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "quantcli"

# rank of each room: a module may import from rooms of its own rank or lower, never higher
RANKS = {
    "errors": 0, "progress": 0, "digests": 0, "names": 0, "registry": 0, "inputs": 0,
    "codecs": 1,
    "formats": 2,
    "engine": 3, "checkpoint": 3, "convert": 3,
    "calibrate": 4, "plan": 4, "allocate": 4, "profiles": 4, "presets": 4,
    "pipelines": 5,
    "cli": 6, "__main__": 6,
}


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "quantcli":
        return None
    return parts[1] if len(parts) > 1 else ""  # "": the package itself (its version)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    module = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base == "quantcli":  # `from quantcli import codecs`: each name is a room
                found += [(node.lineno, f"quantcli.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, base))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py"))


def test_every_room_has_a_rank():
    rooms = {p.relative_to(PKG).parts[0].removesuffix(".py") for p in _modules()} - {"__init__"}
    assert rooms <= set(RANKS), f"rooms without a rank: {sorted(rooms - set(RANKS))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_import_reaches_up(path):
    rel = path.relative_to(PKG)
    room = rel.parts[0].removesuffix(".py")
    if room == "__init__":
        rank = 0
    else:
        rank = RANKS[room]
    upward = []
    for line, target in _imports(path):
        other = _room(target)
        if other is None or other == "":
            continue
        if RANKS.get(other, 99) > rank:
            upward.append(f"{rel}:{line} imports {target} ({other} is above {room})")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_only_the_cli_imports_typer_or_rich(path):
    rel = path.relative_to(PKG)
    if rel.parts[0] in ("cli", "__main__.py"):
        return
    bad = [f"{rel}:{line} imports {t}" for line, t in _imports(path) if t.split(".")[0] in ("typer", "rich")]
    assert not bad, "\n".join(bad)


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function and `from quantcli import x` are both seen."""
    found = _imports(PKG / "pipelines" / "imatrix.py")
    assert any(t == "quantcli.calibrate" or t.startswith("quantcli.calibrate.") for _, t in found)
    assert any(t == "quantcli.checkpoint" for _, t in found)
