"""Write files so that a reader never sees a half-written one: write to a temporary name, then rename.

`os.replace` is atomic on POSIX within one file system, so the temporary file lives in the target folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

TEMP_SUFFIX = ".partial"
T = TypeVar("T")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; the renamed file gets the permissions an ordinary
# open() would have given it (shared results folders, containers running as another user)
_FILE_MODE = 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error remove it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name lets a cleanup tell a dead writer's leftovers from a live writer's file
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{target.name}.pid{os.getpid()}.", suffix=TEMP_SUFFIX, dir=target.parent
    )
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        if temp.exists():
            os.chmod(temp, _FILE_MODE)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def save_json(data: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def save_npz(path: str | os.PathLike, compress: bool = True, **arrays: np.ndarray) -> None:
    with atomic_path(path) as temp:
        with open(temp, "wb") as handle:
            (np.savez_compressed if compress else np.savez)(handle, **arrays)


def save_pickle(data: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as temp:
        with open(temp, "wb") as handle:
            pickle.dump(data, handle)


def writer_is_alive(temporary: Path) -> bool:
    """Whether the process that is writing `temporary` still runs (on this machine)."""
    match = re.search(r"\.pid(\d+)\.", temporary.name)
    if match is None:
        return False
    return process_is_alive(int(match.group(1)))


def process_is_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (one of another user counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def exclusive_claim(path: str | os.PathLike) -> Iterator[bool]:
    """Yields whether this process holds `path`, a claim file made exclusively (O_EXCL) with its pid, so that
    several processes over one folder (benchmark parts, two trainings sharing a proposal store) never do the same
    work at once; the claim is removed on exit. A claim left by a process that died is taken over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and process_is_alive(owner):
                yield False
                return
            path.unlink(missing_ok=True)  # its owner died: take over
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
        return
    yield False


CLAIM_POLL_SECONDS = 5.0  # how often a process looks again at items another process holds


def wait_for_claims() -> None:
    time.sleep(CLAIM_POLL_SECONDS)


def each_claimed(items: Iterable[T], claim_path: Callable[[T], Path]) -> Iterator[T]:
    """Yields each item while this process holds its claim (`exclusive_claim(claim_path(item))`), so that processes
    working through the same items (two trainings filling one proposal store) share them: an item another live
    process holds is left to it and visited again after the rest, when the caller finds it done (or takes it over
    from a process that died)."""
    pending = list(items)
    while pending:
        held = []
        for item in pending:
            with exclusive_claim(claim_path(item)) as mine:
                if not mine:
                    held.append(item)
                    continue
                yield item
        if held and len(held) == len(pending):
            wait_for_claims()  # every item left is another process's now
        pending = held


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporaries left by killed writers (never a live writer's); returns how many were removed."""
    removed = 0
    folder = Path(folder)
    if folder.is_dir():
        for stale in folder.glob(f".*{TEMP_SUFFIX}"):
            if writer_is_alive(stale):
                continue
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
                removed += 1
    return removed


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
