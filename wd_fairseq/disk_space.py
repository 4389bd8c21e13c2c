"""Disk space: refuse work that will not fit, and report a disk that fills anyway.

:func:`require_free_space` checks an estimate before the work starts; inside
:func:`disk_full_errors`, a write that fails for lack of space (``ENOSPC``/``EDQUOT``,
or torch.save's short-write errors, which do not say so) becomes a WDSetupError naming
the directory, the space needed and free, and the fix, after the partial files are
removed. Both say the same, so a user sees one kind of message.
"""

import contextlib
import errno
import glob
import os
import shutil
from typing import Iterable, Iterator, Tuple

from .teacher import WDSetupError

#: torch.save's messages for a write that came up short (a full disk).
TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")


def human(size: float) -> str:
    """``size`` bytes in binary units: 512 B, 3.0 KiB, 1.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def free_bytes(directory: str) -> int:
    """Free bytes (for this user) on the file system of ``directory`` or, while it
    does not exist yet, of its nearest existing parent."""
    directory = os.path.abspath(directory)
    while not os.path.exists(directory):
        directory = os.path.dirname(directory)
    return shutil.disk_usage(directory).free


def _message(directory: str, what: str, needed: int, fix: str, cause: str = "") -> str:
    return (f"{directory}: not enough disk space for {what}{cause}: it needs about "
            f"{human(needed)} (estimate), {human(free_bytes(directory))} is free there. Fix: {fix}")


def require_free_space(directory: str, needed: int, what: str, fix: str) -> None:
    """Refuse to start ``what`` (about ``needed`` bytes) where less is free."""
    if needed > free_bytes(directory):
        raise WDSetupError(_message(directory, what, needed, fix))


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a write that failed for lack of space."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, RuntimeError) and any(s in str(error) for s in TORCH_SHORT_WRITE)


@contextlib.contextmanager
def disk_full_errors(directory: str, needed: int, what: str, fix: str,
                     partial: Iterable[str] = ()) -> Iterator[None]:
    """Turn a full disk while writing ``what`` into a WDSetupError, first removing the
    ``partial`` files (paths or glob patterns) it leaves."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        for pattern in partial:
            for path in glob.glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WDSetupError(_message(directory, what, needed, fix,
                                    f" (the disk filled while writing: {reason})")) from e


def tensor_sizes(obj) -> Tuple[int, int]:
    """(elements, bytes) of the tensors in a (nested) checkpoint object, shared storage
    once (as torch.save writes it)."""
    import torch

    seen, elements, total, todo = set(), 0, 0, [obj]
    while todo:
        item = todo.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                elements += storage.nbytes() // item.element_size()
                total += storage.nbytes()
        elif isinstance(item, dict):
            todo += item.values()
        elif isinstance(item, (list, tuple)):
            todo += item
    return elements, total

