"""The data side of ``wd-distill``: raw parallel text made into the teacher's data-bin
(``prepare``: Moses and subword-nmt BPE or SentencePiece as ``wd-translate`` and the
recipes, then ``fairseq-preprocess`` with the teacher's dictionaries), and the KD
data-bin (links to the data-bin's files, beside which ``wd-kd-data`` writes ``train1``)."""

import functools
import os
from typing import List, Optional

from .files import atomic_writer
from .stages import Command, Stage
from .teacher import WDSetupError

SPLITS = ("train", "valid", "test")


def raw_files(raw_dir: str, source_lang: str, target_lang: str) -> List[str]:
    """The raw files ``RAW/{train,valid,test}.{SRC,TGT}``; refused when one is missing or
    the two sides of a split differ in lines."""
    files = []
    for split in SPLITS:
        counts = []
        for lang in (source_lang, target_lang):
            path = os.path.join(raw_dir, f"{split}.{lang}")
            if not os.path.isfile(path):
                raise WDSetupError(f"--raw-dir {raw_dir}: no {split}.{lang}. Fix: put the raw text "
                                   f"of {' '.join(SPLITS)} there as SPLIT.{source_lang} and SPLIT.{target_lang}, "
                                   "one sentence a line")
            with open(path, "rb") as f:
                counts.append(sum(1 for _ in f))
            files.append(path)
        if counts[0] != counts[1]:
            raise WDSetupError(f"--raw-dir {raw_dir}: {split}.{source_lang} has {counts[0]} lines, "
                               f"{split}.{target_lang} {counts[1]}. Fix: align the two sides line by line")
    return files


def encode_text(raw: str, out: str, lang: str, tokenizer: str, bpe_codes: Optional[str],
                sentencepiece: Optional[str]) -> None:
    """``out``: the lines of ``raw`` as the teacher's subword tokens (one line per line)."""
    from .translate import TextCodec

    codec = TextCodec(lang, lang, tokenizer, bpe_codes, None, 50, sentencepiece)
    with open(raw, encoding="utf-8", newline="\n") as f, atomic_writer(out) as w:
        for line in f:
            w.write(" ".join(codec.encode(line.rstrip("\n"))) + "\n")


def link_data(data: str, kd_bin: str) -> None:
    """``kd_bin``: a link to every file of the data-bin ``data`` (the data-bin itself is
    never written)."""
    os.makedirs(kd_bin, exist_ok=True)
    for name in sorted(os.listdir(data)):
        source, link = os.path.join(data, name), os.path.join(kd_bin, name)
        if os.path.isfile(source) and not os.path.lexists(link):
            os.symlink(source, link)


def prepare_stage(job, checked) -> Stage:
    """Raw text to ``WORK/data-bin``: subword tokens as the teacher's data, binarised with
    its dictionaries."""
    text_dir, src, tgt = job.path("text"), checked.source_lang, checked.target_lang
    actions = [functools.partial(os.makedirs, text_dir, exist_ok=True)]
    actions += [functools.partial(encode_text, os.path.join(os.path.abspath(job.raw_dir), f"{split}.{lang}"),
                                  os.path.join(text_dir, f"{split}.{lang}"), lang, job.tokenizer,
                                  job.bpe_codes and os.path.abspath(job.bpe_codes),
                                  job.sentencepiece and os.path.abspath(job.sentencepiece))
                for split in SPLITS for lang in (src, tgt)]
    actions.append(Command(["fairseq-preprocess", "--source-lang", src, "--target-lang", tgt,
                            *[part for split in SPLITS for part in (f"--{split}pref", os.path.join(text_dir, split))],
                            "--destdir", job.data_bin, "--srcdict", os.path.join(checked.dicts, f"dict.{src}.txt"),
                            "--tgtdict", os.path.join(checked.dicts, f"dict.{tgt}.txt"),
                            "--workers", str(max(1, min(8, os.cpu_count() or 1)))]))
    return Stage("prepare", actions=actions, outputs=[text_dir, job.data_bin],
                 inputs={"raw": checked.data_stamp})
