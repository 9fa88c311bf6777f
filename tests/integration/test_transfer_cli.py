"""Whole transfers through the CLI: ``stx recv --once`` and ``stx send`` in subprocesses, the key
in a 0600 file made by ``stx keygen -o``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from itest_support import (
    BLOCK,
    SEND_JSON_FIELDS,
    STX,
    CliReceiver,
    assert_dest_exactly,
    blocks_for,
    expected_digest,
    make_keyfile,
    run_stx,
    sha256_file,
    write_random,
)

SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 32 * BLOCK + 12345]


@pytest.fixture(scope="module")
def module_keyfile(shm_dir: Path) -> Path:
    path = shm_dir / "cli.key"
    make_keyfile(path)
    return path


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("size", SIZES)
def test_cli_transfer_arrives_identical(
    cli_receiver: Callable[..., CliReceiver],
    module_keyfile: Path,
    scratch: Path,
    size: int,
    workers: int,
) -> None:
    src_dir, dest = scratch / "src", scratch / "dst"
    src_dir.mkdir()
    dest.mkdir()
    src = src_dir / f"cli-{size}-{workers}.bin"
    want = write_random(src, size)
    receiver = cli_receiver(module_keyfile, dest, workers=2, once=True)

    run = run_stx(
        "send",
        src,
        receiver.address,
        "--psk-file",
        module_keyfile,
        "--workers",
        str(workers),
        "--block-size",
        "64K",
        "--json",
    )

    assert run.rc == 0, run.stderr
    assert "Traceback" not in run.stderr
    nblocks = blocks_for(size, BLOCK)
    summary = run.json()
    missing = [k for k in SEND_JSON_FIELDS if k not in summary]
    assert not missing, f"--json lacks {missing}"
    assert summary["file"] == str(src)
    assert summary["bytes"] == size
    assert summary["block_size"] == BLOCK
    assert summary["blocks_total"] == nblocks
    assert summary["blocks_sent"] == nblocks
    assert summary["blocks_resumed"] == 0
    assert summary["retransmits"] == 0
    assert summary["reconnects"] == 0
    assert summary["workers"] == min(workers, max(1, nblocks))
    assert isinstance(summary["seconds"], int | float) and summary["seconds"] >= 0
    assert summary["digest"] == expected_digest(src, BLOCK)

    # --once: the receiver exits 0 by itself after this one transfer
    assert receiver.wait(timeout=20) == 0, receiver.stderr
    assert "Traceback" not in receiver.stderr
    out = dest / src.name
    assert sha256_file(out) == want
    assert out.stat().st_size == size
    assert_dest_exactly(dest, {src.name})
    (line,) = receiver.json_lines()
    assert line["bytes"] == size
    assert line["digest"] == summary["digest"]
    assert line["blocks_total"] == nblocks
    assert Path(line["file"]).name == src.name


@pytest.mark.timeout(60)
def test_stx_send_and_stx_recv_aliases(
    cli_receiver: Callable[..., CliReceiver], module_keyfile: Path, scratch: Path
) -> None:
    """``stx-recv`` and ``stx-send`` are ``stx recv`` and ``stx send``."""
    dest = scratch / "dst"
    dest.mkdir()
    src = scratch / "alias.bin"
    want = write_random(src, 3 * BLOCK + 5)
    receiver = cli_receiver(module_keyfile, dest, workers=1, program=STX.parent / "stx-recv")

    run = run_stx(
        src,
        receiver.address,
        "--psk-file",
        module_keyfile,
        "--block-size",
        "64K",
        "--workers",
        "1",
        "--json",
        program=STX.parent / "stx-send",
    )

    assert run.rc == 0, run.stderr
    assert run.json()["blocks_total"] == 4
    assert receiver.wait(timeout=20) == 0
    assert sha256_file(dest / src.name) == want
    assert_dest_exactly(dest, {src.name})
