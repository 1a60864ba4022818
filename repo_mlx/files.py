"""Outputs that appear whole or not at all: a kill, an error or Ctrl-C during a
write leaves the previous file or folder (or nothing), never a torn one."""

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from .errors import LoadError

# What this project writes at the top of its output folders: only a folder holding one
# of them (or an empty one) is replaced with --force.
OURS = ("config.json", "adapter_config.json", "pretrain_args.json", "results.json")

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
    """Remove the scratch files and folders that killed processes left in ``folder``; returns them.
    A ``.NAME.old-PID`` whose NAME is gone is the only copy of the previous output (the kill came
    between the two renames): it is put back instead."""
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


def check_outputs(outputs: dict, inputs: dict, force: bool, replaced: set) -> None:
    """The output rule of every command, before any work: an output never names an
    input or another output, an output file never replaces a file of an input folder,
    and a folder in ``replaced`` never holds an input; if it exists it needs --force,
    and is replaced only if this project wrote it (or it is empty), never the current
    folder or one above it. Both maps: flag -> path."""
    here = Path.cwd().resolve()
    ins = {f: Path(p).resolve() for f, p in inputs.items() if p is not None and Path(p).exists()}
    seen = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        out = Path(path).resolve()
        for other, was in seen.items():
            if out == was:
                raise LoadError(f"{flag} and {other} name the same place, {path}: each output needs its own.")
        seen[flag] = out
        for f, p in ins.items():
            if out == p or (out.is_file() and p in out.parents) or (flag in replaced and out in p.parents):
                raise LoadError(f"{flag} {path} would overwrite {f} {inputs[f]}, an input of this run: choose another place.")
        if flag in replaced and out.exists():
            if out == here or out in here.parents:
                raise LoadError(f"{flag} {path} is the current folder or one above it, which repo_mlx never replaces: name a new folder.")
            if not force:
                raise LoadError(f"{flag} {path} already exists; pass --force to replace it.")
            if any(out.iterdir()) and not any((out / name).is_file() for name in OURS):
                raise LoadError(f"{flag} {path} holds files repo_mlx did not write; --force replaces only a folder it "
                                "wrote (or an empty one): name a new folder.")


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
