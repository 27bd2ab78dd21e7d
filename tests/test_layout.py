"""The house rules: arrows point down between the rooms, rooms use each other's public surface
only, each room's ``__all__`` is what it exports, and the wheel installs nothing but ``moorage``."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("proxy", "cache", "upstreams", "config")
#: What each room may import from moorage.
ALLOWED = {
    "config": set(),
    "upstreams": {"config"},
    "cache": {"config", "upstreams"},
    "proxy": {"config", "upstreams", "cache"},
}


def imports_of(path: Path, root: Path = ROOT) -> list[str]:
    """The full name of everything ``path`` imports, relative imports resolved: ``from
    ..proxy import errors`` in a module of cache is ``moorage.proxy.errors``, and ``from
    moorage.cache import _store`` reaches a private module as ``moorage.cache._store`` does."""
    package = ["moorage", *path.relative_to(root).parent.parts]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = [*base, *(node.module.split(".") if node.module else [])]
            names += [".".join([*module, alias.name]) for alias in node.names]
    return names


def modules(room: str) -> list[Path]:
    return sorted((ROOT / room).rglob("*.py"))


@pytest.mark.parametrize("room", ROOMS)
def test_arrows_point_down(room: str) -> None:
    for path in modules(room):
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] != "moorage":
                continue
            target = parts[1]
            assert target == room or target in ALLOWED[room], f"{path.relative_to(ROOT)} imports {name}"
            if target != room:
                assert not any(p.startswith("_") for p in parts[2:]), (
                    f"{path.relative_to(ROOT)} reaches into a private module: {name}"
                )


def test_relative_imports_are_seen_for_what_they_reach(tmp_path: Path) -> None:
    """Only absolute imports were checked: ``from ..proxy import errors`` in cache passed."""
    probe = tmp_path / "cache" / "_probe.py"
    probe.parent.mkdir()
    probe.write_text("from ..proxy import errors\nfrom . import _store\nfrom ._index import Index\n")
    assert imports_of(probe, tmp_path) == [
        "moorage.proxy.errors",
        "moorage.cache._store",
        "moorage.cache._index.Index",
    ]


@pytest.mark.parametrize("room", ["cache", "upstreams", "config"])
def test_only_proxy_knows_the_http_server(room: str) -> None:
    for path in modules(room):
        assert not [n for n in imports_of(path) if n.startswith("aiohttp")], path


def test_the_grammar_module_is_a_leaf() -> None:
    imported = imports_of(ROOT / "upstreams" / "reference.py")
    assert not [n for n in imported if n.startswith(("moorage", "httpx", "aiohttp"))]


@pytest.mark.parametrize("room", ROOMS)
def test_all_lists_exactly_the_public_names(room: str) -> None:
    package = importlib.import_module(f"moorage.{room}")
    public = {name for name in vars(package) if not name.startswith("_")}
    submodules = {p.stem for p in (ROOT / room).glob("*.py")} | {"annotations"}
    assert set(package.__all__) == public - submodules


@pytest.mark.parametrize("room", ROOMS)
def test_every_module_says_what_lives_there(room: str) -> None:
    for path in modules(room):
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(ROOT)} has no docstring"


def test_the_wheel_installs_only_moorage(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("moorage-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    version = wheel.name.split("-")[1]
    assert top == {"moorage", f"moorage-{version}.dist-info"}
    for room in ROOMS:
        assert f"moorage/{room}/__init__.py" in names
    assert not [n for n in names if n.startswith("moorage/tests")]
