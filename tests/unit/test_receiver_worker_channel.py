"""A receiver worker's channel, in this process (no worker process): typed jobs and cancels in,
typed reports out; what is not a job is dropped with any descriptor that came with it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from stxpar.workers.receiver import Worker

from stxpar import ipc, layout, messages
from stxpar.errors import ConnectError
from stxpar.layout import Layout
from stxpar.messages import Cancel, Prepare, StreamFailed, StreamJob

pytestmark = pytest.mark.timeout(30)

SID = b"\x05" * 16


@pytest.fixture
def layout_file(tmp_path: Path) -> str:
    """The layout of a one-file transfer of 1 byte (its partial is the job's path)."""
    path = str(tmp_path / "layout")
    layout.write(path, Layout(1 << 20, ((0, 1),), (None,)))
    return path


def _job(stream: int, layout_path: str, *, sid: bytes = SID) -> StreamJob:
    return StreamJob(
        session_id=sid,
        stream=stream,
        secret=b"\x01" * 32,
        path="/nonexistent/.f.stxpart",
        tree=False,
        layout=layout_path,
        manifest_id=b"\x02" * 16,
        rekey_records=1 << 20,
        rekey_bytes=1 << 30,
        sync_bytes=1 << 20,
        streams=1,
        inode=None,
    )


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[socket.socket, zmq.Socket, Worker]]:
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/report"
    pull = ipc.configure(ctx.socket(zmq.PULL))
    pull.bind(endpoint)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = Worker(theirs.detach(), endpoint)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield mine, pull, worker
    finally:
        mine.close()
        thread.join(5)
        worker.close()
        worker.ctx.destroy(linger=0)
        pull.close(linger=0)
        ctx.destroy(linger=0)


def _report(pull: zmq.Socket) -> messages.Message:
    assert pull.poll(5000), "no report"
    return messages.decode(pull.recv(), expect=messages.RECEIVER_REPORTS)


def test_garbage_on_the_channel_is_dropped_with_its_descriptor(
    rig: tuple[socket.socket, zmq.Socket, Worker], layout_file: str
) -> None:
    chan, pull, worker = rig
    a, b = socket.socketpair()
    try:
        socket.send_fds(chan, [b"stream"], [a.fileno()])  # the old positional format
        socket.send_fds(chan, [messages.encode(messages.Beat())], [a.fileno()])
        a.close()
        # the worker closed its copies: the peer sees EOF once ours is closed too
        b.settimeout(5)
        assert b.recv(1) == b""
        assert not worker.streams
        # and it still serves its channel: a job that lost its descriptor is reported
        chan.send(messages.encode(_job(7, layout_file)))
        got = _report(pull)
        assert isinstance(got, StreamFailed) and (got.session_id, got.stream) == (SID, 7)
        assert got.code == ConnectError.wire_code and "out of file descriptors" in got.message
    finally:
        b.close()


def test_a_job_runs_and_a_cancel_ends_it(
    rig: tuple[socket.socket, zmq.Socket, Worker], layout_file: str
) -> None:
    chan, pull, worker = rig
    ours, theirs = socket.socketpair()
    try:
        # the partial file does not exist: the stream fails at once, and says so
        socket.send_fds(chan, [messages.encode(_job(3, layout_file))], [theirs.fileno()])
        theirs.close()
        got = _report(pull)
        assert isinstance(got, StreamFailed) and got.stream == 3
        assert "cannot open the partial file" in got.message
        chan.send(messages.encode(Cancel(SID)))  # nothing left to cancel: no harm
        chan.send(messages.encode(_job(4, layout_file)))
        assert isinstance(_report(pull), StreamFailed)
    finally:
        ours.close()


def test_a_job_whose_layout_cannot_be_read_fails(
    rig: tuple[socket.socket, zmq.Socket, Worker], tmp_path: Path
) -> None:
    chan, pull, worker = rig
    bad = tmp_path / "bad-layout"
    bad.write_bytes(b"not a layout")
    cases = [
        (str(tmp_path / "missing"), "cannot read the transfer's layout"),
        (str(bad), "malformed layout file"),
    ]
    for n, (path, why) in enumerate(cases):
        ours, theirs = socket.socketpair()
        try:
            job = _job(n, path, sid=bytes([n]) * 16)  # a session of its own: no layout kept
            socket.send_fds(chan, [messages.encode(job)], [theirs.fileno()])
            theirs.close()
            got = _report(pull)
            assert isinstance(got, StreamFailed) and got.stream == n
            assert why in got.message
        finally:
            ours.close()


def _held(worker: Worker, sid: bytes, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with worker.lock:
            if sid in worker._layouts:
                return True
        time.sleep(0.01)
    return False


def test_prepare_reads_the_layout_before_the_stream_comes(
    rig: tuple[socket.socket, zmq.Socket, Worker], layout_file: str
) -> None:
    chan, pull, worker = rig
    chan.send(messages.encode(Prepare(SID, layout_file)))
    assert _held(worker, SID)  # read in the background, and kept for the session
    with worker.lock:
        path, plan, space = worker._layouts[SID]
    assert path == layout_file
    # the stream of that session finds it there (the same objects, not a second read)
    assert worker.layout(SID, layout_file) == (plan, space)


def test_a_prepare_that_cannot_read_is_silent_and_the_stream_says_why(
    rig: tuple[socket.socket, zmq.Socket, Worker], tmp_path: Path
) -> None:
    chan, pull, worker = rig
    missing = str(tmp_path / "missing")
    chan.send(messages.encode(Prepare(SID, missing)))
    assert not pull.poll(300)  # no report for a prepare
    ours, theirs = socket.socketpair()
    try:
        socket.send_fds(chan, [messages.encode(_job(1, missing))], [theirs.fileno()])
        theirs.close()
        got = _report(pull)
        assert isinstance(got, StreamFailed) and "cannot read the transfer's layout" in got.message
    finally:
        ours.close()
