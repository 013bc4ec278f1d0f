"""Detect CPU load from other processes on the machine (stdlib only, Linux).

The benchmark machines are small (2 cores) and may be shared: a test run or build of
someone else's halves or worse every wall-clock figure.  ``ForeignLoad`` measures,
over a timed section, how many CPUs were busy with work that was *not* this process
or its waited-for children: (busy jiffies in /proc/stat - own CPU time) / wall time.
``wait_quiet`` blocks until that falls below a threshold.
"""
import os
import time

_HZ = os.sysconf("SC_CLK_TCK")


def _busy_s():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)        # idle + iowait
    guest = sum(v[8:10]) if len(v) > 9 else 0         # already counted in user/nice
    return (sum(v) - idle - guest) / _HZ


def _own_s():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ForeignLoad:
    """with ForeignLoad() as fl: ...; fl.cpus -> CPUs used by other processes."""

    def __enter__(self):
        self._w, self._b, self._o = time.perf_counter(), _busy_s(), _own_s()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._w
        other = (_busy_s() - self._b) - (_own_s() - self._o)
        self.cpus = max(0.0, other / wall) if wall > 0 else 0.0
        return False


def wait_quiet(threshold=0.15, window_s=1.0, max_wait_s=None, log=None):
    """Wait until other processes use < threshold CPUs over window_s. Returns waited s.

    Gives up after max_wait_s (default: env CPULOAD_MAX_WAIT_S or 60 s); the timed run
    then goes ahead and its foreign load is on record."""
    if max_wait_s is None:
        max_wait_s = float(os.environ.get("CPULOAD_MAX_WAIT_S", "60"))
    t0 = time.perf_counter()
    while True:
        with ForeignLoad() as fl:
            time.sleep(window_s)
        waited = time.perf_counter() - t0
        if fl.cpus < threshold or waited > max_wait_s:
            if log and waited > 2 * window_s:
                log(f"waited {waited:.0f} s for a quiet machine (foreign load {fl.cpus:.2f} CPUs)")
            return waited
