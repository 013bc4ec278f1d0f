"""Make a child process import another checkout of this repository as `edgellama`.

The repository root *is* the package (pyproject's package-dir maps ./ to edgellama,
./runtime to edgellama.runtime, ...), so a folder holding one link `edgellama -> CHECKOUT`,
put first on PYTHONPATH, makes a child import that checkout's code. An installed copy
does not interfere: pip's editable finder runs after the entries on sys.path.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

WHERE = "import edgellama.runtime.model as m; print(m.__file__)"


def checkout_env(checkout: Path, shims: Path, base: dict | None = None) -> dict:
    """`base` (default os.environ) with PYTHONPATH led by a folder whose `edgellama`
    links to `checkout`; the folder lives under `shims`, one per checkout."""
    root = Path(checkout).resolve()
    if not (root / "runtime" / "model.py").is_file():
        raise SystemExit(f"{checkout}: not an edgellama checkout (no runtime/model.py); "
                         "make one with `git worktree add DIR COMMIT`")
    shim = Path(shims) / hashlib.sha1(str(root).encode()).hexdigest()[:12]
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "edgellama"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(root, target_is_directory=True)
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env.get("PYTHONPATH", "")) if p)
    return env


def check_import(checkout: Path, env: dict, python: str = sys.executable) -> str:
    """The file `edgellama.runtime.model` comes from under `env`; exits unless it lies
    in `checkout` (an import error there is the checkout's, shown as is)."""
    p = subprocess.run([python, "-c", WHERE], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{checkout}: `import edgellama.runtime.model` failed:\n{p.stderr[-2000:]}")
    where = p.stdout.strip().splitlines()[-1]
    shim_link = Path(env["PYTHONPATH"].split(os.pathsep)[0]) / "edgellama"
    if not Path(where).is_relative_to(shim_link):
        raise SystemExit(f"{checkout}: the child imported edgellama from {where}, not from the checkout")
    return str(Path(checkout).resolve() / Path(where).relative_to(shim_link))


def describe(checkout: Path) -> dict:
    """Path, commit and whether the working tree differs from it (git's view)."""
    def git(*args: str) -> str:
        p = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else ""
    commit = git("rev-parse", "HEAD")
    return {"path": str(Path(checkout).resolve()), "commit": commit or None,
            "modified": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None}
