"""How an OSError on the destination reaches the sender: retry, or refusal."""

from __future__ import annotations

import errno
import os

import pytest

from stxpar.destination import disk_error
from stxpar.errors import ConnectError, RejectedError

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE])
def test_out_of_descriptors_is_retryable(code: int) -> None:
    err = disk_error(OSError(code, os.strerror(code)), "cannot prepare .f.stxpart")
    assert isinstance(err, ConnectError) and err.wire_code == 4
    assert str(err).startswith("receiver busy: cannot prepare .f.stxpart")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_full_disk_is_a_refusal(code: int) -> None:
    err = disk_error(OSError(code, os.strerror(code)), "cannot prepare x")
    assert isinstance(err, RejectedError)
    assert "the receiver's disk is full" in str(err)


def test_other_errors_are_refusals() -> None:
    err = disk_error(OSError(errno.EACCES, "Permission denied"), "cannot prepare x")
    assert isinstance(err, RejectedError) and str(err) == "cannot prepare x: Permission denied"
