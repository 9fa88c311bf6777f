"""The sender's live progress line with helpers (issue 14: "progress reports the workers per
host"): the per-host part, its updates as helpers join and leave, and a line that never wraps."""

from __future__ import annotations

import io

import pytest

from stxpar.cli import Progress

pytestmark = pytest.mark.timeout(10)

MIB = 1 << 20


def _line(p: Progress, done: int = 300 * MIB, total: int = 600 * MIB) -> str:
    out = p.stream
    assert isinstance(out, io.StringIO)
    out.seek(0)
    out.truncate()
    p(done, total)
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\x1b[K")
    return text[1:-3]


def _progress(label: str = "cluster-src.bin", columns: int = 100) -> Progress:
    p = Progress(io.StringIO(), label, columns=columns)
    p.local = 4
    p.local_name = "dtn1.example.org"
    return p


def test_no_helpers_no_hosts_part() -> None:
    p = _progress()
    assert "hosts" not in _line(p)


def test_workers_per_host_as_helpers_join_and_leave() -> None:
    p = _progress()
    p.cluster_event("helper_joined", {"host": "dtn2.example.org", "workers": 4})
    p.cluster_event("helper_joined", {"host": "dtn3.example.org", "workers": 4})
    line = _line(p)
    assert line.endswith("  hosts local:4 dtn2:4 dtn3:4"), line
    assert line.startswith("cluster-src.bin: 300.0 MiB / 600.0 MiB")
    assert len(line) < 100, (len(line), line)  # the last column stays free: no wrap
    p.cluster_event("helper_left", {"host": "dtn2.example.org", "workers": 4, "reason": "x"})
    assert _line(p).endswith("  hosts local:4 dtn3:4")
    p.cluster_event("helper_left", {"host": "dtn3.example.org", "workers": 4, "reason": "x"})
    assert "hosts" not in _line(p)  # no helper left: the plain line again


def test_two_helpers_on_one_host_and_one_on_this_host() -> None:
    p = _progress()
    p.cluster_event("helper_joined", {"host": "dtn2", "workers": 2})
    p.cluster_event("helper_joined", {"host": "dtn2", "workers": 3})
    p.cluster_event("helper_joined", {"host": "dtn1.example.org", "workers": 1})
    assert _line(p).endswith("  hosts local:5 dtn2:5")
    p.cluster_event("helper_left", {"host": "dtn2", "workers": 2, "reason": "x"})
    assert _line(p).endswith("  hosts local:5 dtn2:3")


def test_no_local_workers() -> None:
    p = _progress()
    p.local = 0
    p.cluster_event("helper_joined", {"host": "10.0.0.2", "workers": 8})
    assert _line(p).endswith("  hosts 10.0.0.2:8")


def test_many_hosts_and_long_names_stay_short() -> None:
    p = _progress(columns=120)
    for i in range(6):
        p.cluster_event("helper_joined", {"host": f"data-transfer-node-{i}.site", "workers": 16})
    line = _line(p)
    assert line.endswith("  hosts local:4 data-tran~:16 data-tran~:16 +4"), line
    assert line.startswith("cluster-src.bin: ") and len(line) < 120
    p.columns = 100  # fewer hosts named
    line = _line(p)
    assert line.endswith("  hosts local:4 +6"), line
    assert line.startswith("cluster-src.bin: ") and len(line) < 100


@pytest.mark.parametrize("columns", [100, 120])
def test_a_long_label_is_cut_to_the_terminal(columns: int) -> None:
    label = "a-rather-long-file-name-of-a-run-" + "x" * 60 + ".tar"
    p = _progress(label=label, columns=columns)
    p.cluster_event("helper_joined", {"host": "dtn2", "workers": 4})
    p.cluster_event("helper_joined", {"host": "dtn3", "workers": 4})
    line = _line(p)
    assert len(line) == columns - 1, line
    assert line.startswith("a-rather-l") and "...: 300.0 MiB" in line
    assert line.endswith("  hosts local:4 dtn2:4 dtn3:4")
    p.columns = 200  # room for all of it
    assert _line(p).startswith(label + ": 300.0 MiB")


def test_a_narrow_terminal_names_fewer_hosts() -> None:
    p = _progress(columns=80)
    p.cluster_event("helper_joined", {"host": "dtn2", "workers": 4})
    line = _line(p)
    assert line == "cluster-src.bin: 300.0 MiB / 600.0 MiB   50.0%      0.0 MB/s  ETA 0:00  hosts 2"
    p.columns = 60  # not even that: the line without helpers
    line = _line(p)
    assert "hosts" not in line and line.startswith("cluster-s...: 300.0 MiB")
