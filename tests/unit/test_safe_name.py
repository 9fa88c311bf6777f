"""The receiver's file-name rule, as a pure function."""

from __future__ import annotations

import pytest

from stxpar.errors import RejectedError
from stxpar.receiver import safe_name


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("data.bin", "data.bin"),
        ("../x", "x"),
        ("/etc/passwd", "passwd"),
        ("a\\b\\c.txt", "c.txt"),
        ("naïve café.txt", "naïve café.txt"),
        ("with space", "with space"),
    ],
)
def test_names_are_reduced_to_a_base_name(sent: str, stored: str) -> None:
    assert safe_name(sent) == stored


@pytest.mark.parametrize(
    "sent",
    [
        "",
        ".",
        "..",
        ".hidden",
        "dir/",
        "a\x00b",
        "a\nb",
        "a\x1b[2Kb",
        "a\x7fb",
        "a\x85b",
        "evil\u202etxt.exe",
        "zero\u200bwidth",
        "x" * 256,
    ],
)
def test_unsafe_names_are_refused(sent: str) -> None:
    with pytest.raises(RejectedError, match="unsafe file name"):
        safe_name(sent)
