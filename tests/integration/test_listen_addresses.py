"""``stx recv --listen localhost:P`` listens on every address ``localhost`` resolves to
(issue 11): with Debian's usual ``/etc/hosts`` (``::1`` listed before ``127.0.0.1``) it used
to bind ::1 only, and a sender to 127.0.0.1 found nobody.

The receiver runs in a mount namespace of its own (``unshare -m``) where a test ``/etc/hosts``
lists ``::1 localhost`` first; the senders run outside it and name each address explicitly.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from itest_support import (
    STX,
    CliReceiver,
    free_port,
    make_keyfile,
    run_stx,
    sha256_file,
    write_random,
)

HOSTS = "::1 localhost ip6-localhost\n127.0.0.1 localhost\n"


def _namespace_works(hosts: Path) -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f'mount --bind "{hosts}" /etc/hosts && getent ahosts localhost',
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return probe.returncode == 0 and probe.stdout.split()[:1] == ["::1"]


@pytest.fixture
def in_namespace(tmp_path: Path) -> Path:
    """A program that runs ``stx recv ARGS`` where localhost is ::1 first, then 127.0.0.1."""
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this machine")
    if not _namespace_works(hosts):
        pytest.skip("cannot bind-mount a test /etc/hosts in a mount namespace here")
    wrapper = tmp_path / "stx-recv-ns"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'exec unshare -m sh -c \'mount --bind "{hosts}" /etc/hosts && exec "$0" recv "$@"\''
        f' "{STX}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.timeout(120)
def test_every_resolved_address_is_listened_on(tmp_path: Path, in_namespace: Path) -> None:
    for d in ("dest", "logs"):
        (tmp_path / d).mkdir()
    key = tmp_path / "stx.key"
    make_keyfile(key)
    recv = CliReceiver(
        key,
        tmp_path / "dest",
        tmp_path / "logs",
        once=False,
        listen="localhost:0",
        program=in_namespace,
    ).start()
    try:
        assert recv.host == "::1"  # the first address: what ``address`` reports
        assert f"and 127.0.0.1:{recv.port}" in recv.stderr  # the others are named
        for i, target in enumerate((f"127.0.0.1:{recv.port}", f"[::1]:{recv.port}")):
            src = tmp_path / f"f{i}.bin"
            digest = write_random(src, 70_000)
            run = run_stx("send", src, target, "--psk-file", key, "--max-retries", "1")
            assert run.rc == 0, (target, run.stderr)
            assert sha256_file(tmp_path / "dest" / src.name) == digest
    finally:
        recv.stop()


@pytest.mark.timeout(60)
def test_an_address_that_cannot_be_bound_is_named(tmp_path: Path, in_namespace: Path) -> None:
    """127.0.0.1:P is taken: ``stx recv --listen localhost:P`` says which address failed."""
    (tmp_path / "dest").mkdir()
    key = tmp_path / "stx.key"
    make_keyfile(key)
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        run = subprocess.run(
            [str(in_namespace), "--listen", f"localhost:{port}", "--psk-file", str(key)]
            + ["--dest", str(tmp_path / "dest")],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert run.returncode == 2, run.stderr
    assert f"(127.0.0.1:{port}, one of the addresses localhost resolves to)" in run.stderr
    assert "address already in use" in run.stderr
    assert "Traceback" not in run.stderr
