"""Atomic file writes (a reader sees the old file or the complete new one, never a part),
a file's SHA-256 and its stamp (path, size, mtime).

The new content goes to a temporary file in the target's directory (one file system,
so the rename is atomic), is flushed and fsynced, gets the permissions a plain
``open()`` would give it, and replaces the target with ``os.replace``; on any error the
temporary file is removed. A process killed mid-write leaves only the hidden temporary
file (``.NAME.XXXXXXXX.tmp`` unless named otherwise). Standard library only, so tools
load it without fairseq (examples/recipes/recipe_tools.py).
"""

import contextlib
import hashlib
import os
import tempfile
from typing import IO, Dict, Iterator, Optional, Union


@contextlib.contextmanager
def atomic_writer(path: str, mode: str = "w", prefix: Optional[str] = None,
                  suffix: str = ".tmp") -> Iterator[IO]:
    """A file open for writing (``mode`` ``"w"``: UTF-8 text with ``\\n`` line ends;
    ``"wb"``: bytes) that replaces ``path`` once the block ends without an error.
    ``prefix``, ``suffix``: the temporary file's name around mkstemp's random part."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{os.path.basename(path)}.", suffix=suffix,
                               dir=directory)
    try:
        text = {"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would (mkstemp makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes (hex), read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(path: str, content_hash: bool = False) -> Dict:
    """Path, size and mtime of a file, and with ``content_hash`` its SHA-256 (what a
    manifest or a made-file record holds of an input)."""
    stat = os.stat(path)
    stamp = {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if content_hash:
        stamp["sha256"] = sha256_file(path)
    return stamp


def write_atomic(path: str, data: Union[str, bytes]) -> None:
    """Replace ``path`` by ``data`` (text as UTF-8) atomically."""
    with atomic_writer(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
