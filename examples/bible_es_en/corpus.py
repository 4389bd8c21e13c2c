#!/usr/bin/env python3
"""Extract the shipped Spanish-English Bible corpus to plain text.

    python examples/bible_es_en/corpus.py OUT_DIR

writes OUT_DIR/{train,valid,test}.{es,en} (UTF-8, one sentence per line,
line-aligned) from the xz files in corpus/ next to this file.  Each file is
written to a temporary name and renamed, so a reader never sees half a file;
a file already present with the expected size is left alone.
"""

import lzma
import os
import sys
import tempfile

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
SPLITS = ("train", "valid", "test")
LANGS = ("es", "en")


def extract(out_dir, corpus_dir=CORPUS):
    """Decompress every split/language into out_dir; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split in SPLITS:
        for lang in LANGS:
            name = f"{split}.{lang}"
            path = os.path.join(out_dir, name)
            with lzma.open(os.path.join(corpus_dir, name + ".xz")) as f:
                data = f.read()
            done = os.path.isfile(path) and os.path.getsize(path) == len(data)
            if not done:
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out_dir)
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, path)
                except BaseException:
                    os.unlink(tmp)
                    raise
            paths.append(path)
    return paths


def main(argv):
    if len(argv) != 2:
        sys.exit(f"usage: {argv[0]} OUT_DIR")
    for path in extract(argv[1]):
        print(path)


if __name__ == "__main__":
    main(sys.argv)
