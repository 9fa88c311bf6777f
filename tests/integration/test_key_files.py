"""Key files follow OpenSSH's rules (issue 11).

* ``stx keygen -o F --force`` never writes through whatever is at F: a symlink planted there
  (to a file another user owns) is replaced, its target untouched.
* A key file must be owned by the user running stx (or by root), whatever its mode; a symlink is
  followed, as ssh does, and the checks apply to the file it leads to.

Real ``stx`` processes and real files; the other user is ``nobody`` (uid 65534), which needs
root to chown to: those tests skip with a reason otherwise.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from itest_support import assert_one_line_error, free_port, make_keyfile, run_stx, write_random

import stxpar

OTHER_UID = 65534  # nobody
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="making a file owned by another user needs root (chown)"
)


def _victim(scratch: Path) -> tuple[Path, bytes]:
    """A file that belongs to another user (when we can chown), with known contents."""
    victim = scratch / "victim" / "their.conf"
    victim.parent.mkdir()
    data = b"someone else's file\n"
    victim.write_bytes(data)
    if os.geteuid() == 0:
        os.chown(victim, OTHER_UID, OTHER_UID)
    return victim, data


@pytest.mark.timeout(30)
def test_keygen_force_replaces_a_planted_symlink_and_spares_its_target(scratch: Path) -> None:
    victim, data = _victim(scratch)
    keyfile = scratch / "stx.key"
    keyfile.symlink_to(victim)
    run = run_stx("keygen", "-o", keyfile, "--force")
    assert run.rc == 0, run.stderr
    assert victim.read_bytes() == data, "keygen --force wrote the key into the symlink's target"
    st = keyfile.lstat()
    assert stat.S_ISREG(st.st_mode), "the symlink is still there"
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert len(stxpar.load_key_file(keyfile)) == 32
    assert sorted(p.name for p in scratch.iterdir()) == ["stx.key", "victim"], "temp file left"


@pytest.mark.timeout(30)
def test_keygen_force_replaces_a_key_atomically(scratch: Path) -> None:
    keyfile = scratch / "stx.key"
    first = make_keyfile(keyfile)
    inode = keyfile.stat().st_ino
    run = run_stx("keygen", "-o", keyfile, "--force")
    assert run.rc == 0, run.stderr
    assert stxpar.load_key_file(keyfile) != first
    assert keyfile.stat().st_ino != inode, "the old file was rewritten in place, not replaced"
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600


@pytest.mark.timeout(30)
@pytest.mark.parametrize("what", ["file", "dangling-symlink", "symlink"])
def test_keygen_without_force_refuses_anything_at_the_name(scratch: Path, what: str) -> None:
    victim, data = _victim(scratch)
    keyfile = scratch / "stx.key"
    missing = scratch / "victim" / "not-yet"
    if what == "file":
        keyfile.write_bytes(b"x")
    elif what == "dangling-symlink":
        keyfile.symlink_to(missing)
    else:
        keyfile.symlink_to(victim)
    run = run_stx("keygen", "-o", keyfile)
    assert run.rc == 2, run.stderr
    assert_one_line_error(run)
    assert "already exists" in run.stderr
    assert victim.read_bytes() == data
    assert not missing.exists(), "keygen created the dangling symlink's target"
    assert sorted(p.name for p in scratch.iterdir()) == ["stx.key", "victim"]


@needs_root
@pytest.mark.timeout(30)
@pytest.mark.parametrize("via_symlink", [False, True])
def test_a_key_file_owned_by_another_user_is_refused(scratch: Path, via_symlink: bool) -> None:
    theirs = scratch / "their.key"
    make_keyfile(theirs)  # a valid key, mode 0600...
    os.chown(theirs, OTHER_UID, OTHER_UID)  # ...that another user owns (and so chose)
    keyfile = theirs
    if via_symlink:
        keyfile = scratch / "my.key"
        keyfile.symlink_to(theirs)
    src = scratch / "data.bin"
    write_random(src, 1000)
    run = run_stx(
        "send", src, f"127.0.0.1:{free_port()}", "--psk-file", keyfile, "--max-retries", "0"
    )
    assert run.rc == 2, (run.rc, run.stderr)
    assert_one_line_error(run)
    assert "owned by another user" in run.stderr, run.stderr
    with pytest.raises(stxpar.UsageError, match="owned by another user"):
        stxpar.load_key_file(keyfile)


@needs_root
@pytest.mark.timeout(30)
def test_a_key_file_owned_by_root_is_accepted(scratch: Path) -> None:
    keyfile = scratch / "root.key"
    key = make_keyfile(keyfile)
    os.chown(keyfile, 0, 0)
    assert stxpar.load_key_file(keyfile) == key


@pytest.mark.timeout(30)
def test_a_symlink_to_my_own_key_file_is_followed(scratch: Path) -> None:
    """As ssh does: the link is followed and the file it leads to is checked (mode, owner)."""
    real = scratch / "vault" / "stx.key"
    real.parent.mkdir()
    key = make_keyfile(real)
    link = scratch / "stx.key"
    link.symlink_to(real)
    assert stxpar.load_key_file(link) == key
    os.chmod(real, 0o644)
    with pytest.raises(stxpar.UsageError, match="chmod 600"):
        stxpar.load_key_file(link)
