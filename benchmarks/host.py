"""What machine a benchmark ran on, for its results file."""

from __future__ import annotations

import os
import platform
import subprocess


def machine() -> dict:
    """CPU model, CPU count, memory, OS and python, from lscpu and /proc/meminfo."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lscpu.splitlines() if ":" in line)}
    mem = next((int(x.split()[1]) for x in open("/proc/meminfo") if x.startswith("MemTotal")), 0)
    return {"cpu": info.get("Model name"), "cpus": os.cpu_count(),
            "cores_per_socket": info.get("Core(s) per socket"), "threads_per_core": info.get("Thread(s) per core"),
            "flags_avx512_vnni": "avx512_vnni" in info.get("Flags", ""),
            "mem_gib": round(mem / 2**20, 1), "os": platform.platform(), "python": platform.python_version()}


def describe(m: dict) -> str:
    """One line: `AMD EPYC, 2 CPUs, 23.5 GiB`."""
    return f"{m.get('cpu')}, {m.get('cpus')} CPUs, {m.get('mem_gib')} GiB"
