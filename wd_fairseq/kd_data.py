"""``wd-kd-data DATA --teacher-path TEACHER.pt``: sequence-level KD data (WD_SPEC sections 1, 7).

Decodes the source side of a data-bin's training split with the teacher through
fairseq's ``SequenceGenerator`` (beam 6, length penalty 1.0, top-1 hypothesis,
BPE kept), restores corpus order, and writes the result into the same data-bin as
split ``train1`` with the same dictionaries: fairseq's translation task then
trains on ``train`` + ``train1`` concatenated, every source twice. ``valid`` is
not touched.

Real decoding is messy, so:

* empty hypotheses, hypotheses that ran into the length limit (``--max-len-a/b``,
  usually degenerate repetitions) and sources longer than the teacher accepts
  fall back to the sentence's reference target (counted in ``summary.json``), so
  the two halves stay aligned one to one;
* results are saved in shards under ``DATA/kd-train1/`` every
  ``--save-every`` sentences; an interrupted run resumes where it stopped, and a
  run with other settings (teacher, beam, data...) restarts cleanly;
* the split is written to temporary files and renamed into place with the source
  index last: fairseq only sees ``train1`` once every file of it is complete;
* a data-bin whose source and target line counts differ is refused.
"""

import argparse
import glob
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from fairseq import utils
from fairseq.data import Dictionary, LanguagePairDataset, data_utils, indexed_dataset
from fairseq.dataclass.configs import GenerationConfig
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from .teacher import WDSetupError, load_teacher

logger = logging.getLogger("wd_fairseq.kd_data")

OK, EMPTY, OVERLONG, SOURCE_TOO_LONG = "ok", "empty", "overlong", "source-too-long"
#: A progress line at most this often (and once at the end).
PROGRESS_SECONDS = 30


def infer_langs(data: str, split: str) -> Tuple[str, str]:
    """(source, target) languages of ``DATA/{split}.{src}-{tgt}.{src}.idx``."""
    found = sorted(glob.glob(os.path.join(data, f"{split}.*-*.*.idx")))
    for path in found:
        pair, lang = os.path.basename(path)[len(split) + 1:-len(".idx")].split(".")
        src, tgt = pair.split("-")
        if lang == src:
            return src, tgt
    raise WDSetupError(
        f"DATA {data}: no binarised split '{split}' ({split}.SRC-TGT.SRC.idx). Fix: "
        "pass a data-bin written by fairseq-preprocess, or set --source-lang/--target-lang"
    )


class Split:
    """File names of one binarised split ``{data}/{name}.{src}-{tgt}.{lang}``."""

    def __init__(self, data: str, name: str, src: str, tgt: str):
        self.data, self.name, self.src, self.tgt = data, name, src, tgt

    def prefix(self, lang: str) -> str:
        return os.path.join(self.data, f"{self.name}.{self.src}-{self.tgt}.{lang}")

    def files(self) -> List[str]:
        """Every file, in the order they are put in place (source index last)."""
        return [self.prefix(self.tgt) + ".bin", self.prefix(self.tgt) + ".idx",
                self.prefix(self.src) + ".bin", self.prefix(self.src) + ".idx"]

    def visible(self) -> bool:
        """Whether fairseq's translation task would load this split."""
        return os.path.exists(self.prefix(self.src) + ".idx")


def load_side(split: Split, lang: str, dictionary: Dictionary):
    prefix = split.prefix(lang)
    impl = indexed_dataset.infer_dataset_impl(prefix)
    dataset = data_utils.load_indexed_dataset(prefix, dictionary, impl) if impl else None
    if dataset is None:
        raise WDSetupError(
            f"{prefix}.{{bin,idx}}: not found or unreadable. Fix: binarise split "
            f"'{split.name}' with fairseq-preprocess into {split.data}"
        )
    return dataset, impl


def classify(tokens: torch.Tensor, max_len: int) -> str:
    """Flag of a hypothesis ``tokens`` (ends with EOS) decoded with length limit ``max_len``."""
    length = tokens.numel() - 1
    if length == 0:
        return EMPTY
    if length >= max_len:  # the generator forces EOS at max_len: the hypothesis did not end
        return OVERLONG
    return OK


class ShardStore:
    """Decoded sentences saved as ``part-NNNNNN.tsv`` (``id<TAB>flag<TAB>text``)
    in a work directory, with the run's settings in ``manifest.json``."""

    def __init__(self, directory: str):
        self.directory = directory

    def shards(self) -> List[str]:
        return sorted(glob.glob(os.path.join(self.directory, "part-*.tsv")))

    def open(self, manifest: Dict) -> None:
        """Keep the shards of an earlier run with the same manifest, else start afresh."""
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, "manifest.json")
        old = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        if old != manifest:
            if self.shards():
                logger.info("%s: earlier shards were made with other settings; restarting",
                            self.directory)
            for shard in self.shards():
                os.remove(shard)
            write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def load(self) -> Dict[int, Tuple[str, str]]:
        done = {}
        for shard in self.shards():
            with open(shard, encoding="utf-8") as f:
                for line in f:
                    index, flag, text = line.rstrip("\n").split("\t", 2)
                    done[int(index)] = (flag, text)
        return done

    def save(self, rows: List[Tuple[int, str, str]]) -> None:
        name = os.path.join(self.directory, f"part-{len(self.shards()):06d}.tsv")
        write_text_atomic(name, "".join(f"{i}\t{flag}\t{text}\n" for i, flag, text in rows))


def write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_stamp(path: str) -> Dict:
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def decode(teacher, task, source, todo: np.ndarray, store: ShardStore, gen: GenerationConfig,
           max_tokens: Optional[int], batch_size: Optional[int], save_every: int,
           device: torch.device) -> None:
    """Decode the sentences ``todo`` of ``source``, saving shards every ``save_every``."""
    dataset = LanguagePairDataset(source, source.sizes, task.source_dictionary, shuffle=False)
    tgt_dict = task.target_dictionary
    max_source = min(teacher.max_positions()[0], task.cfg.max_source_positions)
    ordered = dataset.ordered_indices()
    ordered = ordered[np.isin(ordered, todo)]
    too_long = ordered[source.sizes[ordered] > max_source]
    ordered = ordered[source.sizes[ordered] <= max_source]
    rows = [(int(i), SOURCE_TOO_LONG, "") for i in too_long]
    batches = dataset.batch_by_size(ordered, max_tokens=max_tokens, max_sentences=batch_size)
    generator = task.build_generator([teacher], gen)
    start = reported = time.time()
    done = 0
    for batch in batches:
        sample = dataset.collater([dataset[i] for i in batch])
        sample = utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample
        hypos = task.inference_step(generator, [teacher], sample)
        src_len = sample["net_input"]["src_tokens"].size(1)
        max_len = min(int(gen.max_len_a * src_len + gen.max_len_b), generator.max_len - 1)
        for index, nbest in zip(sample["id"].tolist(), hypos):
            tokens = nbest[0]["tokens"].cpu()
            text = " ".join(tgt_dict[t] for t in tokens[:-1].tolist())
            rows.append((index, classify(tokens, max_len), text))
        done += len(batch)
        if len(rows) >= save_every:
            store.save(rows)
            rows = []
        if time.time() - reported >= PROGRESS_SECONDS or done == len(ordered):
            reported = time.time()
            logger.info("decoded %d/%d sentences (%.1f sentences/s)",
                        done, len(ordered), done / (reported - start))
    if rows:
        store.save(rows)


def write_split(out: Split, rows: List[torch.Tensor], source_prefix: str, impl: str,
                vocab_size: int) -> None:
    """Write ``out`` (target ``rows``, source copied from ``source_prefix``) so that
    fairseq never sees it half-written: temporary files first, then renames with
    the source index last."""
    if out.visible():
        os.remove(out.prefix(out.src) + ".idx")
    tmp = {path: os.path.join(out.data, ".kd-tmp." + os.path.basename(path))
           for path in out.files()}
    tgt_bin, tgt_idx, src_bin, src_idx = out.files()
    builder = indexed_dataset.make_builder(tmp[tgt_bin], impl=impl, vocab_size=vocab_size)
    for row in rows:
        builder.add_item(row)
    builder.finalize(tmp[tgt_idx])
    for ext, path in ((".bin", src_bin), (".idx", src_idx)):
        with open(source_prefix + ext, "rb") as f_in, open(tmp[path], "wb") as f_out:
            while chunk := f_in.read(1 << 24):
                f_out.write(chunk)
    for path in out.files():
        with open(tmp[path], "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp[path], path)


def build_kd_split(data: str, teacher_path: str, source_lang: Optional[str] = None,
                   target_lang: Optional[str] = None, split: str = "train",
                   out_split: str = "train1", beam: int = 6, lenpen: float = 1.0,
                   max_len_a: float = 2.0, max_len_b: int = 10,
                   max_tokens: Optional[int] = 4096, batch_size: Optional[int] = None,
                   save_every: int = 50000, fp16: bool = False, cpu: bool = False,
                   overwrite: bool = False) -> Dict:
    """Decode ``split`` of ``data`` with the teacher and write it as ``out_split``.

    Returns the summary (also written to ``DATA/kd-{out_split}/summary.json``).
    """
    if not os.path.isdir(data):
        raise WDSetupError(f"DATA {data}: no such directory. Fix: pass a fairseq data-bin")
    if out_split == split:
        raise WDSetupError(f"--out-split {out_split}: must differ from --split {split}")
    if source_lang is None or target_lang is None:
        source_lang, target_lang = infer_langs(data, split)
    task = TranslationTask.setup_task(
        TranslationConfig(data=data, source_lang=source_lang, target_lang=target_lang)
    )
    inp = Split(data, split, source_lang, target_lang)
    out = Split(data, out_split, source_lang, target_lang)
    source, impl = load_side(inp, source_lang, task.source_dictionary)
    reference, _ = load_side(inp, target_lang, task.target_dictionary)
    if len(source) != len(reference):
        raise WDSetupError(
            f"{inp.prefix(source_lang)} has {len(source)} sentences but "
            f"{inp.prefix(target_lang)} has {len(reference)}. Fix: re-binarise the "
            "split from parallel text files with equal line counts"
        )
    gen = GenerationConfig(beam=beam, lenpen=lenpen, nbest=1, max_len_a=max_len_a,
                           max_len_b=max_len_b)
    manifest = {
        "teacher": file_stamp(teacher_path) if os.path.isfile(teacher_path) else teacher_path,
        "source": file_stamp(inp.prefix(source_lang) + ".bin"),
        "target": file_stamp(inp.prefix(target_lang) + ".bin"),
        "sentences": len(source), "out_split": out_split,
        "beam": beam, "lenpen": lenpen, "max_len_a": max_len_a, "max_len_b": max_len_b,
        "fp16": fp16,
    }
    store = ShardStore(os.path.join(data, f"kd-{out_split}"))
    summary_path = os.path.join(store.directory, "summary.json")
    if out.visible():
        if not overwrite and os.path.exists(summary_path):
            with open(summary_path, encoding="utf-8") as f:
                summary = json.load(f)
            if summary.get("manifest") == manifest:
                logger.info("%s: up to date", out.prefix(source_lang))
                return summary
        if not overwrite:
            raise WDSetupError(
                f"{out.prefix(source_lang)}.idx exists (from another teacher, data or "
                f"settings). Fix: pass --overwrite to replace split '{out_split}', or "
                "choose another --out-split"
            )
    for stale in glob.glob(os.path.join(data, f".kd-tmp.{out_split}.*")):
        os.remove(stale)

    store.open(manifest)
    done = store.load()
    todo = np.array(sorted(set(range(len(source))) - set(done)), dtype=np.int64)
    started = time.time()
    if len(todo):
        logger.info("decoding %d of %d sentences of %s with beam %d, lenpen %s",
                    len(todo), len(source), inp.prefix(source_lang), beam, lenpen)
        device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
        teacher, _ = load_teacher(teacher_path, task)
        teacher = teacher.to(device).eval()
        if fp16:
            teacher = teacher.half()
        decode(teacher, task, source, todo, store, gen, max_tokens, batch_size, save_every, device)
        done = store.load()
    if sorted(done) != list(range(len(source))):
        raise WDSetupError(
            f"{store.directory}: shards hold {len(done)} sentences, expected "
            f"{len(source)}. Fix: delete {store.directory} and rerun"
        )

    tgt_dict = task.target_dictionary
    rows, lines, counts = [], [], {OK: 0, EMPTY: 0, OVERLONG: 0, SOURCE_TOO_LONG: 0}
    for index in range(len(source)):
        flag, text = done[index]
        counts[flag] += 1
        if flag == OK:
            rows.append(tgt_dict.encode_line(text, add_if_not_exist=False))
        else:
            rows.append(reference[index])
            text = tgt_dict.string(reference[index])
        lines.append(text + "\n")
    write_text_atomic(os.path.join(store.directory, f"{out_split}.{target_lang}"), "".join(lines))
    write_split(out, rows, inp.prefix(source_lang), impl, len(tgt_dict))
    summary = {
        "sentences": len(source), "counts": counts,
        "fallback_to_reference": len(source) - counts[OK],
        "seconds": round(time.time() - started, 1), "manifest": manifest,
    }
    for shard in store.shards():
        os.remove(shard)
    write_text_atomic(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %s.{%s,%s} (%d sentences; fell back to the reference for %d: %s)",
                os.path.join(data, f"{out_split}.{source_lang}-{target_lang}"), source_lang,
                target_lang, len(source), summary["fallback_to_reference"],
                ", ".join(f"{k} {v}" for k, v in counts.items() if k != OK))
    return summary


def cli_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="wd-kd-data",
        description="Sequence-level KD data: decode a data-bin's training source with the "
        "teacher (fairseq's beam search) and write it into the same data-bin as split "
        "train1, which fairseq-train concatenates with train.",
    )
    parser.add_argument("data", metavar="DATA", help="fairseq data-bin (fairseq-preprocess output)")
    parser.add_argument("--teacher-path", required=True, metavar="TEACHER.pt",
                        help="stock fairseq Transformer checkpoint (e.g. an average of the last 5)")
    parser.add_argument("--source-lang", "-s", help="default: inferred from the data-bin")
    parser.add_argument("--target-lang", "-t", help="default: inferred from the data-bin")
    parser.add_argument("--split", default="train", help="split to decode (default: train)")
    parser.add_argument("--out-split", default="train1",
                        help="split to write (default: train1, which fairseq concatenates with "
                        "train; valid stays the real valid split)")
    parser.add_argument("--beam", type=int, default=6, help="beam size (default: 6, the authors')")
    parser.add_argument("--lenpen", type=float, default=1.0, help="length penalty (default: 1.0)")
    parser.add_argument("--max-len-a", type=float, default=2.0,
                        help="length limit a*source+b: hypotheses reaching it fall back to the "
                        "reference (default: a=2, b=10)")
    parser.add_argument("--max-len-b", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=4096, help="source tokens per batch")
    parser.add_argument("--batch-size", type=int, help="sentences per batch (default: no limit)")
    parser.add_argument("--save-every", type=int, default=50000,
                        help="save decoded sentences every N (resume granularity)")
    parser.add_argument("--fp16", action="store_true", help="decode in fp16 (GPU)")
    parser.add_argument("--cpu", action="store_true", help="decode on the CPU even with a GPU")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out split")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=logging.INFO, stream=sys.stdout, force=True)
    try:
        build_kd_split(
            args.data, args.teacher_path, args.source_lang, args.target_lang, args.split,
            args.out_split, args.beam, args.lenpen, args.max_len_a, args.max_len_b,
            args.max_tokens, args.batch_size, args.save_every, args.fp16, args.cpu,
            args.overwrite,
        )
    except WDSetupError as e:
        sys.exit(f"wd-kd-data: error: {e}")


if __name__ == "__main__":
    cli_main()
