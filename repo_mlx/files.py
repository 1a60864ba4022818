"""Outputs that appear whole or not at all: a kill, an error or Ctrl-C during a
write leaves the previous file or folder (or nothing), never a torn one."""

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from .errors import LoadError


# Scratch names of a write in progress: .NAME.partial-PID[...] and .NAME.old-PID.
SCRATCH = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)(\.[^.]*)?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder) -> list:
    """Remove the scratch files and folders that killed processes left in ``folder``.

    A ``.NAME.old-PID`` whose NAME is gone is the only copy of the previous
    output (the kill came between the two renames): it is put back instead.
    Returns what was removed or restored.
    """
    folder = Path(folder)
    done = []
    if not folder.is_dir():
        return done
    for p in folder.iterdir():
        m = SCRATCH.fullmatch(p.name)
        if not m or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not (folder / m["name"]).exists():
            p.rename(folder / m["name"])
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p)
    return done


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a scratch path that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path.parent)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise LoadError(f"Cannot write {path}: {e.strerror or e}.") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(dst, force: bool) -> Iterator[Path]:
    """Yield a scratch folder that becomes ``dst`` only if the block succeeds."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise LoadError(f"{dst} already exists; pass --force to replace it.")
    if dst.exists() and not dst.is_dir():
        raise LoadError(f"{dst} exists and is not a folder.")
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(dst.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    except OSError as e:
        raise LoadError(f"Cannot write {dst}: {e.strerror or e}.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
