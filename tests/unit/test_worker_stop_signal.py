"""A sender worker's SIGTERM that lands in a finalizer is neither printed nor lost.

The coordinator stops its workers with SIGTERM, and the worker's handler raises SystemExit
in its main thread. When the signal happens to be handled inside a ``__del__`` or a weakref
callback, Python cannot propagate the exception: it printed "Exception ignored in:
<function WeakSet...>" with a traceback into the user's terminal (seen once in CI,
tests/adversarial/test_hostile_receiver.py), and the stop was lost. Now the handler also sets
a flag that the worker's loop acts on, and the worker's ``sys.unraisablehook`` keeps that
one exception quiet. Real signal, real interpreter: the script runs in a child process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, signal, threading, types
    from stxpar.workers import sender

    sender.install_signal_handlers()

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100000):  # the handler runs in here, inside the finalizer
                pass

    obj = Finalized()
    del obj
    print("stop requested" if sender._stop_requested.is_set() else "stop lost")
    try:
        state = types.SimpleNamespace(failed=threading.Event(), parent=os.getppid())
        sender.Worker.check_alive(state)
    except SystemExit as exc:
        print("check_alive exits", exc.code)
    """
)


@pytest.mark.timeout(30)
def test_stop_signal_inside_a_finalizer_is_quiet_and_kept() -> None:
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=20)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", run.stderr
    assert run.stdout.split("\n")[:2] == ["stop requested", "check_alive exits 1"], run.stdout


THREAD_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from stxpar.workers import sender

    sender.install_signal_handlers()
    if sys.argv[1] == "stopping":
        sender._stop_requested.set()

    def trip():
        raise RuntimeError("the context went away under this thread")

    t = threading.Thread(target=trip, name="beat")
    t.start()
    t.join()
    print("done")
    """
)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("state", ["running", "stopping"])
def test_a_thread_failing_while_the_worker_stops_is_quiet(state: str) -> None:
    """Once a stop was asked for, a worker thread that trips over the teardown prints nothing
    (half a line of it once reached the user's terminal before the worker was killed);
    before that, a thread's failure is reported as Python does."""
    run = subprocess.run(
        [sys.executable, "-c", THREAD_SCRIPT, state], capture_output=True, text=True, timeout=20
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "done\n"
    if state == "stopping":
        assert run.stderr == "", run.stderr
    else:
        assert "Exception in thread beat" in run.stderr and "RuntimeError" in run.stderr
