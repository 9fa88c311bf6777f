"""The layering the architecture promises (docs/architecture.md §0): the protocol core is pure.

The session cores, the scheduler, the block model, the worker messages, framing, crypto and
the state log import (directly or through other stxpar modules) no socket, ZeroMQ, thread,
process or selector module, so that every state and every malformed input is testable in
memory; and the modules that do I/O stay thin: under half of the code lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
IO = frozenset({"socket", "zmq", "threading", "subprocess", "selectors", "select", "asyncio"})
#: The protocol core: modules that must not reach I/O, even through each other.
PURE = (
    "stxpar.session_base",
    "stxpar.send_session",
    "stxpar.recv_session",
    "stxpar.scheduler",
    "stxpar.blocks",
    "stxpar.manifest",
    "stxpar.messages",
    "stxpar.wire",
    "stxpar.records",
    "stxpar.handshake",
    "stxpar.keyschedule",
    "stxpar.digest",
    "stxpar.state",
    "stxpar.errors",
)


def _module_file(name: str) -> Path:
    parts = name.split(".")
    if parts[:2] == ["stxpar", "workers"]:
        return ROOT.joinpath("workers", *parts[2:]).with_suffix(".py")
    return ROOT.joinpath(*parts).with_suffix(".py")


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports, absolute, from its source."""
    path = _module_file(name)
    package = name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            found.add(mod)
            for alias in node.names:  # "from . import ipc" names a module
                if _module_file(f"{mod}.{alias.name}").exists():
                    found.add(f"{mod}.{alias.name}")
    return found


def _reaches(name: str) -> dict[str, str]:
    """I/O module -> the stxpar module that imports it, over everything ``name`` reaches."""
    seen: set[str] = set()
    hits: dict[str, str] = {}
    todo = [name]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        for imp in _imports(mod):
            top = imp.split(".")[0]
            if top in IO:
                hits.setdefault(top, mod)
            elif top == "stxpar" and _module_file(imp).exists():
                todo.append(imp)
    return hits


@pytest.mark.parametrize("name", PURE)
def test_protocol_core_does_no_io(name: str) -> None:
    assert _module_file(name).exists(), f"{name} is gone: update PURE"
    assert _reaches(name) == {}


def test_the_check_sees_io() -> None:
    """The scan itself works: modules that do I/O are found to."""
    assert "zmq" in _reaches("stxpar.ipc")
    assert "socket" in _reaches("stxpar.netio")


def _code_lines(path: Path) -> int:
    return sum(
        1
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )


def test_io_modules_are_thin() -> None:
    files = sorted([*ROOT.joinpath("stxpar").glob("*.py"), *ROOT.joinpath("workers").glob("*.py")])
    io_lines = total = 0
    table = []
    for path in files:
        rel = path.relative_to(ROOT)
        name = "stxpar.workers." + path.stem if rel.parts[0] == "workers" else "stxpar." + path.stem
        direct = {imp.split(".")[0] for imp in _imports(name)} & IO
        n = _code_lines(path)
        total += n
        if direct:
            io_lines += n
            table.append(f"{n:6} {rel} ({', '.join(sorted(direct))})")
    share = io_lines / total
    assert share < 0.5, f"I/O modules hold {share:.0%} of {total} code lines:\n" + "\n".join(table)
