"""runtime.workers: the daemon threads behind quantize's fits, constrained decoding's masks and
Model.load's side work, fed through C-level queues instead of concurrent.futures (whose
idle-semaphore lock a Ctrl-C can leave held, after which its exit hook waits forever)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from edgellama.runtime.workers import Workers, shared


def test_map_keeps_order_and_raises_the_first_error_after_the_rest():
    pool = Workers(2, "edgellama-test")
    assert pool.map(lambda x: x * x, range(20)) == [x * x for x in range(20)]
    ran = []

    def bad(x):
        ran.append(x)
        if x in (3, 4):
            raise ValueError(f"item {x}")
        return x

    with pytest.raises(ValueError, match="item 3"):
        pool.map(bad, range(6))
    assert sorted(ran) == list(range(6))  # every call ended before the error was raised
    assert pool.map(lambda x: -x, [1, 2]) == [-1, -2]  # still serving after an error
    threads = [t for t in threading.enumerate() if t.name.startswith("edgellama-test-")]
    assert len(threads) == 2 and all(t.daemon for t in threads)


def test_submit_result_and_on_worker():
    pool = Workers(1, "edgellama-test-one")
    assert pool.submit(divmod, 7, 2).result() == (3, 1)
    failing = pool.submit(int, "x")
    with pytest.raises(ValueError):
        failing.result()
    with pytest.raises(ValueError):  # asked again: the same outcome, not a second wait
        failing.result()
    assert not pool.on_worker and pool.submit(lambda: pool.on_worker).result()
    assert shared("edgellama-test-shared", 1) is shared("edgellama-test-shared", 3)
    with pytest.raises(ValueError):
        Workers(0, "none")


@pytest.mark.parametrize("how", ["map", "submit"])
def test_ctrl_c_with_work_queued_exits_at_once(how):
    """Interrupted with 200 half-second calls queued, the process exits as soon as the main
    thread has handled the interrupt: nothing waits for work whose result nobody reads."""
    wait = ("pool.map(lambda _: time.sleep(0.5), range(200))" if how == "map" else
            "[p.result() for p in [pool.submit(time.sleep, 0.5) for _ in range(200)]]")
    code = ("import signal, threading, time\n"
            "from edgellama.runtime.workers import Workers\n"
            "pool = Workers(2, 'edgellama-t')\n"
            "threading.Timer(0.5, signal.raise_signal, (signal.SIGINT,)).start()\n"
            f"try:\n    {wait}\n"
            "except KeyboardInterrupt:\n    print('interrupted', flush=True)\n")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "interrupted", out.stderr
    assert time.monotonic() - started < 15


def test_the_runtime_background_work_runs_on_daemon_threads(tmp_path_factory):
    """Model.load's side work and constrained decoding's masks run on runtime.workers' daemon
    threads (concurrent.futures' are not daemons, and its exit hook joins them)."""
    from tests.conftest import tiny_model_of_layout
    from edgellama.runtime.contract import KVLayout

    tiny = tiny_model_of_layout(tmp_path_factory, KVLayout.SHARED)
    assert tiny.generate_text("The quick brown fox", max_new_tokens=6, regex="[a-z ]*") is not None
    for name in ("edgellama-load-", "edgellama-mask-"):
        threads = [t for t in threading.enumerate() if t.name.startswith(name)]
        assert threads and all(t.daemon for t in threads), name
