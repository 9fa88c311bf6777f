"""``stx demo``: the whole pipeline on this machine, verified by itself, cleaned up after."""

from __future__ import annotations

from pathlib import Path

import pytest
from itest_support import SEND_JSON_FIELDS, run_stx


def _demo_root(summary: dict[str, object]) -> Path:
    # the summary names the source file: <root>/src/demo.bin
    src = Path(str(summary["file"]))
    assert src.name == "demo.bin" and src.parent.name == "src", src
    return src.parent.parent


@pytest.mark.timeout(90)
def test_demo_json_and_cleanup() -> None:
    run = run_stx("demo", "--size", "8M", "--json", timeout=60)

    assert run.rc == 0, run.stderr
    assert "Traceback" not in run.stderr
    summary = run.json()
    missing = [k for k in (*SEND_JSON_FIELDS, "sha256") if k not in summary]
    assert not missing, f"demo --json lacks {missing}"
    assert summary["bytes"] == 8 << 20
    assert summary["blocks_total"] == summary["blocks_sent"] == (8 << 20) // summary["block_size"]
    assert summary["blocks_resumed"] == 0
    assert len(str(summary["sha256"])) == 64
    assert len(str(summary["digest"])) == 64
    root = _demo_root(summary)
    assert root.name.startswith("stx-demo-")
    assert not root.exists(), f"stx demo left {root} behind"


@pytest.mark.timeout(90)
def test_demo_in_a_given_directory_leaves_it_empty(scratch: Path) -> None:
    run = run_stx(
        "demo", "--size", "1M", "--workers", "2", "--block-size", "64K", "--dir", scratch, "--json"
    )

    assert run.rc == 0, run.stderr
    summary = run.json()
    assert summary["bytes"] == 1 << 20
    assert summary["blocks_total"] == 16
    assert _demo_root(summary).parent == scratch
    assert list(scratch.iterdir()) == []


@pytest.mark.timeout(30)
def test_demo_in_a_missing_directory_is_a_usage_error(scratch: Path) -> None:
    run = run_stx("demo", "--size", "1M", "--dir", scratch / "nope")

    assert run.rc == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
