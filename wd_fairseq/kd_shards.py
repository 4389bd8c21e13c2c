"""The decoded sentences of a ``wd-kd-data`` run, saved as they come so that an
interrupted run resumes: shards ``part-WW-NNNNNN.tsv`` of rows ``id<TAB>flag<TAB>text``
(sorted by id; ``WW`` the writing process) in a work directory, with the run's settings
in ``manifest.json`` and, once a shard job has decoded all of its sentences, its record
in ``complete.json``. Other settings restart the store empty; the merged rows of one or
several stores stream in corpus order, at most ``MAX_OPEN_SHARDS`` files open at once.
"""

import glob
import heapq
import json
import logging
import os
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .files import atomic_writer, write_atomic

logger = logging.getLogger("wd_fairseq.kd_shards")

#: Shards merged at once (open files); more are first merged into bigger shards.
MAX_OPEN_SHARDS = 128
#: The record of a store whose job has saved all of its sentences.
COMPLETE = "complete.json"

Row = Tuple[int, str, str]  # (corpus index, flag, hypothesis text)


class ShardStore:
    """The shards and manifest of one work directory; ``worker`` numbers the shards
    this process writes."""

    def __init__(self, directory: str, worker: int = 0):
        self.directory, self.worker = directory, worker

    def shards(self) -> List[str]:
        return sorted(glob.glob(os.path.join(self.directory, "part-*.tsv")))

    def manifest(self) -> Optional[Dict]:
        """The recorded settings (None: no run started here)."""
        return _read_json(os.path.join(self.directory, "manifest.json"))

    def open(self, manifest: Dict) -> None:
        """Keep the shards of an earlier run with the same manifest, else start afresh."""
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, "manifest.json")
        old = self.manifest()
        for stale in glob.glob(os.path.join(self.directory, ".*.tmp")):  # left by a killed run
            os.remove(stale)
        if old != manifest:
            if self.shards():
                logger.info("%s: earlier shards were made with other settings; restarting",
                            self.directory)
            for stale in self.shards() + [os.path.join(self.directory, COMPLETE)]:
                if os.path.exists(stale):
                    os.remove(stale)
            write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def done(self, sentences: int) -> np.ndarray:
        """Boolean mask (``sentences``,) of the sentences already saved."""
        mask = np.zeros(sentences, dtype=bool)
        for shard in self.shards():
            with open(shard, encoding="utf-8") as f:
                for line in f:
                    mask[int(line[:line.index("\t")])] = True
        return mask

    def finish(self, record: Dict) -> None:
        """Record that every sentence of this store's job is saved (``record``: its summary)."""
        write_atomic(os.path.join(self.directory, COMPLETE),
                     json.dumps(record, indent=2, sort_keys=True) + "\n")

    def finished(self) -> Optional[Dict]:
        """The record of :meth:`finish` (None: not finished)."""
        return _read_json(os.path.join(self.directory, COMPLETE))

    def save(self, rows: List[Row]) -> None:
        self._write(sorted(rows))

    def _write(self, rows) -> None:
        own = sorted(glob.glob(os.path.join(self.directory, f"part-{self.worker:02d}-*.tsv")))
        number = int(os.path.basename(own[-1])[8:-4]) + 1 if own else 0
        path = os.path.join(self.directory, f"part-{self.worker:02d}-{number:06d}.tsv")
        with atomic_writer(path) as f:
            for index, flag, text in rows:
                f.write(f"{index}\t{flag}\t{text}\n")

    def merged(self) -> Iterator[Row]:
        """Every saved row once, in corpus order, streamed from the shards."""
        return merged_rows([self])

    def compact(self, most: int) -> None:
        """Merge the oldest shards until at most ``most`` are left."""
        while len(self.shards()) > most:
            group = self.shards()[:MAX_OPEN_SHARDS]
            self._write(_merge(group))
            for shard in group:  # a crash before this leaves duplicates, which _merge drops
                os.remove(shard)


def merged_rows(stores: List[ShardStore]) -> Iterator[Row]:
    """Every row saved in ``stores`` once, in corpus order (stores of one split that
    hold different sentences: the shard jobs of ``kd_split_jobs``). Each store is first
    merged down to its share of ``MAX_OPEN_SHARDS`` files (at least one each)."""
    for store in stores:
        store.compact(max(1, MAX_OPEN_SHARDS // len(stores)))
    return _merge([shard for store in stores for shard in store.shards()])


def _merge(shards: List[str]) -> Iterator[Row]:
    files = [open(shard, encoding="utf-8") for shard in shards]
    try:
        previous = None
        rows = (map(_parse_row, f) for f in files)
        for row in heapq.merge(*rows, key=lambda r: r[0]):
            if row[0] != previous:
                previous = row[0]
                yield row
    finally:
        for f in files:
            f.close()


def _read_json(path: str) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _parse_row(line: str) -> Row:
    index, flag, text = line.rstrip("\n").split("\t", 2)
    return int(index), flag, text
