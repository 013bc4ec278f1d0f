"""Atomic output folders: write under a temporary name beside the target, rename when complete."""

from __future__ import annotations

import errno
import glob
import logging
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgellama.runtime.errors import BadArgumentError, BadModelFileError, OutputExistsError, OutputWriteError

log = logging.getLogger("edgellama")

# Write failures that mean "no room", and what to tell the user about each.
_NO_ROOM = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "a file hit the file-size limit",
}


@contextmanager
def atomic_folder(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; on success it becomes `target`.

    On any failure — an error, Ctrl-C, a full disk — the temporary folder is removed and
    an existing `target` is left untouched.
    """
    target = check_target(target, force)
    clear_stale_partials(target)
    tmp = target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    try:  # entered before the folder exists: a Ctrl-C right after mkdir still removes it
        try:
            tmp.mkdir(mode=0o700)
        except OSError as exc:
            raise BadArgumentError(
                f"{target.parent}: cannot write here ({exc.strerror}); choose a writable output folder"
            ) from None
        yield tmp
        _replace(tmp, target)
    except OSError as exc:
        _remove(tmp)
        if exc.errno not in _NO_ROOM:
            raise
        raise OutputWriteError(
            f"{target}: {_NO_ROOM[exc.errno]} ({exc.strerror}) while writing it; nothing was kept — "
            "free some space (or raise the limit) or choose another output folder"
        ) from None
    except BaseException:
        _remove(tmp)
        raise


def clear_stale_partials(target: Path) -> list[Path]:
    """Remove the temporary folders a killed writer (SIGKILL, power loss) left beside `target`:
    their writer's process id is in the name, and a writer that no longer runs will never
    finish them. One named by an older edgellama (no process id) is left alone and named."""
    cleared = []
    for tmp in Path(target).parent.glob(f".{glob.escape(Path(target).name)}.*.partial"):
        pid = tmp.name[len(Path(target).name) + 2:].split("-", 1)[0]
        if not pid.isdigit():
            log.warning("%s was left by an interrupted write; remove it if no export is running", tmp)
            continue
        if _alive(int(pid)):
            continue
        if tmp.is_dir():
            _remove(tmp)
        else:
            tmp.unlink(missing_ok=True)
        cleared.append(tmp)
        log.warning("removed %s, left by an interrupted write (process %s is gone)", tmp, pid)
    return cleared


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: leave it
    return True


def _remove(path: Path) -> None:
    """rmtree that another Ctrl-C cannot cut short (it would leave a half-written folder)."""
    while True:
        try:
            shutil.rmtree(path, ignore_errors=True)
            return
        except KeyboardInterrupt:
            continue


def check_target(target: Path, force: bool) -> Path:
    """Refuse an unusable output path before any work is done; returns it absolute."""
    target = Path(target).absolute()
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists; pass --force to replace it")
    if target.exists() and not target.is_dir():
        raise BadArgumentError(f"{target}: exists and is not a folder; choose another output path")
    if not target.parent.is_dir():
        raise BadArgumentError(f"{target.parent}: output's parent folder does not exist; create it first")
    return target


def check_not_source(source: Path, target: Path) -> None:
    """--force replaces the target: refuse when that would delete the input being read."""
    source, target = Path(source).resolve(), Path(target).resolve()
    if target == source or target in source.parents:
        raise BadArgumentError(f"{target}: the output would replace the input {source}; choose another output folder")


def _replace(tmp: Path, target: Path) -> None:
    os.chmod(tmp, 0o755)  # made 0700: private while incomplete
    if not target.exists():
        os.rename(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:  # an error or Ctrl-C between the renames: the old folder goes back
        if not tmp.exists():
            _remove(old)  # the new one is in place after all
        elif old.exists() and not target.exists():
            os.rename(old, target)
        raise
    _remove(old)


def copy_model_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy a model folder's other files (tokenizer, chat template, configs) into dst.
    A link that leads outside the folder is refused: a downloaded folder must not make
    the tool copy some other file of this machine into its output."""
    root = Path(src).resolve()
    for f in sorted(Path(src).iterdir()):
        if f.name in skip or f.name.startswith("."):
            continue
        if f.is_symlink() and root not in f.resolve().parents:
            raise BadModelFileError(f"{f}: a link to a file outside the model folder; refusing to copy it — "
                                    "put the file itself in the folder")
        if f.is_file():
            shutil.copy2(f, dst / f.name)
