"""``wd-trim-vocab TEACHER.pt DATA OUT``: a teacher and data-bin cut down to the tokens of a
few directions, so that every student made from them is too.

A multilingual teacher (M2M-100: 128k entries; NLLB: 256k) spends most of a small
student's parameters, and of WD's embedding generators (a scale and a shift per token and
student dimension), on tokens that the directions a student serves never use. This tool
keeps the special symbols and every token that occurs in the chosen directions' splits
of DATA (any side, any split: train, the KD split, valid, test), in the dictionary's
order, and writes into OUT:

* ``dict.LANG.txt``: the kept entries (a multilingual task appends its language tokens
  for ``--langs`` again, now only the kept languages');
* every split of the kept directions, token ids renumbered (same element type and index,
  streamed in chunks: memory does not grow with the corpus);
* ``teacher.pt``: the teacher with the rows of its embedding and output tables of the
  kept entries (language tokens included), in the new order; its config points at OUT by
  absolute paths (data, ``--fixed-dictionary``) and lists the kept ``--langs`` (in the
  teacher's order) and ``--lang-pairs``, so it is a stock fairseq
  checkpoint of the small vocabulary: it scores the kept tokens exactly as before, its
  softmax normalised over them only;
* ``trim.json``: sizes before and after, and the data-bin and flags phase 1 takes
  (``phase1_flags``; the command prints them).

OUT appears complete or not at all (written beside it, then renamed).
"""

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from fairseq.data import Dictionary, indexed_dataset
from omegaconf import OmegaConf, open_dict

from .arguments import pair_list
from .checkpoints import save_atomic, task_flags
from .cli import run_cli
from .multilingual import data_task, direction_task, is_multilingual, lang_pairs, task_settings
from .teacher import WDSetupError, read_checkpoint

#: Tensors indexed by the source / target vocabulary (rows), where a model has them.
SOURCE_TABLES = ("encoder.embed_tokens.weight",)
TARGET_TABLES = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")
_SPLIT = re.compile(r"^(?P<split>[^.]+)\.(?P<src>[^.-]+)-(?P<tgt>[^.-]+)\.(?P<lang>[^.]+)\.idx$")
CHUNK = 1 << 24  # tokens renumbered at a time


def find_splits(data: str, pairs: Sequence[Tuple[str, str]]) -> List[Tuple[str, str, str, str]]:
    """(split, src, tgt, lang) of every binarised file of ``pairs`` in ``data``."""
    found = []
    for path in sorted(glob.glob(os.path.join(data, "*.idx"))):
        m = _SPLIT.match(os.path.basename(path))
        if m and (m["src"], m["tgt"]) in pairs:
            found.append((m["split"], m["src"], m["tgt"], m["lang"]))
    return found


def _prefix(data: str, split: str, src: str, tgt: str, lang: str) -> str:
    return os.path.join(data, f"{split}.{src}-{tgt}.{lang}")


def _tokens(prefix: str) -> Tuple[np.memmap, np.dtype]:
    """The token ids of a binarised split, as one flat array (mmap format only)."""
    if not indexed_dataset.MMapIndexedDataset.exists(prefix):
        raise WDSetupError(f"{prefix}.idx: not in fairseq's mmap format. Fix: binarise with "
                           "fairseq-preprocess --dataset-impl mmap (its default)")
    dtype = indexed_dataset.MMapIndexedDataset(prefix)._index.dtype
    return np.memmap(prefix + ".bin", dtype=dtype, mode="r"), dtype


def used_ids(data: str, files, vocab_size: int) -> Dict[str, np.ndarray]:
    """Per language, a mask (vocab_size,) of the ids its splits use."""
    used: Dict[str, np.ndarray] = {}
    for split, src, tgt, lang in files:
        tokens, _ = _tokens(_prefix(data, split, src, tgt, lang))
        mask = used.setdefault(lang, np.zeros(vocab_size, dtype=bool))
        for start in range(0, len(tokens), CHUNK):
            mask[np.unique(tokens[start:start + CHUNK])] = True
    return used


def kept_dictionary(dictionary: Dictionary, mask: np.ndarray) -> Dictionary:
    """The special symbols and the entries of ``mask``, in ``dictionary``'s order."""
    small = Dictionary()  # <s> <pad> </s> <unk>, as fairseq-preprocess starts
    if dictionary.symbols[:small.nspecial] != small.symbols:
        raise WDSetupError("the data-bin's dictionary does not start with fairseq's special "
                           f"symbols {small.symbols}. Fix: binarise with fairseq-preprocess")
    for i in np.flatnonzero(mask[:len(dictionary)]):
        if i >= small.nspecial:
            small.add_symbol(dictionary.symbols[i], n=dictionary.count[i])
    return small


def renumber(src_prefix: str, dst_prefix: str, mapping: np.ndarray) -> None:
    """Copy a binarised split with every id ``i`` replaced by ``mapping[i]``."""
    tokens, dtype = _tokens(src_prefix)
    if int(mapping.max()) > np.iinfo(dtype).max:
        raise AssertionError("a smaller vocabulary never needs a wider type")
    with open(dst_prefix + ".bin", "wb") as out:
        for start in range(0, len(tokens), CHUNK):
            out.write(mapping[tokens[start:start + CHUNK]].astype(dtype).tobytes())
    shutil.copyfile(src_prefix + ".idx", dst_prefix + ".idx")


def row_index(old: Dictionary, new: Dictionary, what: str) -> torch.Tensor:
    """For every entry of ``new``, its row in tables of ``old``."""
    missing = [s for s in new.symbols if s not in old.indices]
    if missing:
        raise WDSetupError(f"{what}: {missing[:5]} not in the teacher's dictionary")
    return torch.tensor([old.indices[s] for s in new.symbols])


def trim(teacher_path: str, data: str, out: str, pairs: Optional[Sequence[str]] = None,
         force: bool = False) -> Dict:
    """Write OUT (see the module's docstring); return ``trim.json``'s contents."""
    if os.path.exists(out) and not force:
        raise WDSetupError(f"OUT {out} exists. Fix: pass --force to replace it, or choose another")
    state = read_checkpoint(teacher_path, "TEACHER")
    run = task_settings(state["cfg"]["task"])
    multilingual = is_multilingual(run)
    if pairs:
        kept_pairs = [tuple(p.split("-")) for p in pairs]
    elif multilingual:
        kept_pairs = lang_pairs(run)
    else:
        kept_pairs = [(run["source_lang"], run["target_lang"])]
    files = find_splits(data, kept_pairs)
    missing = [p for p in kept_pairs if not any((f[1], f[2]) == p for f in files)]
    if missing:
        raise WDSetupError(f"DATA {data}: no binarised split of {', '.join('-'.join(p) for p in missing)}. "
                           "Fix: binarise those directions with the teacher's dictionary, or drop them from --pairs")
    for src, tgt in kept_pairs:
        data_task(state, data, src, tgt, "TEACHER", teacher_path)
    langs = sorted({lang for pair in kept_pairs for lang in pair})
    dictionaries = {lang: Dictionary.load(os.path.join(data, f"dict.{lang}.txt")) for lang in langs}
    shared = multilingual or len({tuple(d.symbols) for d in dictionaries.values()}) == 1
    size = max(len(d) for d in dictionaries.values())
    used = used_ids(data, files, size)
    if shared:  # one dictionary for every language: the union of what they use
        union = np.any([used.get(lang, np.zeros(size, bool)) for lang in langs], axis=0)
        used = {lang: union for lang in langs}
    small = {lang: kept_dictionary(dictionaries[lang], used[lang]) for lang in langs}

    parent = os.path.dirname(os.path.abspath(out))
    scratch = tempfile.mkdtemp(prefix=".wd-trim-vocab-", dir=parent)
    try:
        for lang in langs:
            small[lang].save(os.path.join(scratch, f"dict.{lang}.txt"))
        for split, src, tgt, lang in files:
            mapping = np.zeros(len(dictionaries[lang]), dtype=np.int64)
            mapping[[dictionaries[lang].indices[s] for s in small[lang].symbols]] = np.arange(len(small[lang]))
            renumber(_prefix(data, split, src, tgt, lang), _prefix(scratch, split, src, tgt, lang), mapping)
        trimmed, summary = trimmed_teacher(state, run, data, scratch, out, kept_pairs, langs, multilingual,
                                           f"TEACHER {teacher_path}")
        save_atomic(trimmed, os.path.join(scratch, "teacher.pt"))
        summary.update(teacher=os.path.abspath(teacher_path), data=os.path.abspath(data),
                       pairs=["-".join(p) for p in kept_pairs], files=len(files))
        with open(os.path.join(scratch, "trim.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


def trimmed_teacher(state: dict, run: dict, data: str, scratch: str, out: str, kept_pairs, langs,
                    multilingual: bool, what: str) -> Tuple[dict, Dict]:
    """The teacher's checkpoint with its vocabulary tables cut to OUT's dictionaries
    (language tokens included), and its config pointing at OUT."""
    src, tgt = kept_pairs[0]
    out = os.path.abspath(out)  # (the config's paths resolve from any working directory)
    if multilingual:
        old_task = direction_task(run, data, src, tgt, what)
        # (NLLB's data-source tags go: no kept text uses them, and fairseq main's task
        # cannot add them); the kept languages stay in the teacher's order
        new_run = dict(run, data=out, langs=[lang for lang in old_task.langs if lang in langs], lang_dict=None,
                       add_data_source_prefix_tags=False, lang_pairs=",".join("-".join(p) for p in kept_pairs),
                       fixed_dictionary=os.path.join(out, f"dict.{src}.txt") if run.get("fixed_dictionary") else None)
        # the new task's dictionaries, built from the files in scratch (paths of OUT-to-be)
        probe = dict(new_run, data=scratch, fixed_dictionary=os.path.join(scratch, f"dict.{src}.txt")
                     if new_run["fixed_dictionary"] else None)
        new_task = direction_task(probe, scratch, src, tgt, what)
        old = (old_task.source_dictionary, old_task.target_dictionary)
        new = (new_task.source_dictionary, new_task.target_dictionary)
    else:
        new_run = dict(run, data=out)
        old = tuple(Dictionary.load(os.path.join(data, f"dict.{lang}.txt")) for lang in (src, tgt))
        new = tuple(Dictionary.load(os.path.join(scratch, f"dict.{lang}.txt")) for lang in (src, tgt))
    rows = (row_index(old[0], new[0], what), row_index(old[1], new[1], what))
    original = state["model"]
    model = dict(original)
    tables = {}
    for side, names in enumerate((SOURCE_TABLES, TARGET_TABLES)):
        for name in names:
            if name not in model:
                continue
            model[name] = model[name].index_select(0, rows[side])
            tables[name] = [original[name].shape[0], model[name].shape[0]]
    cfg = state["cfg"]
    with open_dict(cfg):
        if isinstance(cfg.task, argparse.Namespace):  # a legacy task (the multilingual one)
            cfg.task = argparse.Namespace(**new_run)
        else:
            cfg.task.data = out
    summary = {"source_vocabulary": [len(old[0]), len(new[0])],
               "target_vocabulary": [len(old[1]), len(new[1])], "tables": tables,
               "parameters": [parameters(original), parameters(model, like=original)],
               "phase1_flags": [out, *task_flags(new_run), "--teacher-path", os.path.join(out, "teacher.pt")]}
    # saved as fairseq saves: plain containers (the legacy task's Namespace inside); the
    # optimizer moments of the old vocabulary do not fit the new tables
    cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return dict(state, cfg=cfg, model=model, last_optimizer_state=None), summary


def parameters(tensors: Dict[str, torch.Tensor], like: Optional[Dict[str, torch.Tensor]] = None) -> int:
    """Parameters of a state dict, each tensor shared between names (tied embeddings)
    counted once; ``like``: the state dict whose sharing to follow."""
    seen, total = set(), 0
    for name, tensor in tensors.items():
        key = (like or tensors)[name].data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return int(total)


def cli_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="wd-trim-vocab",
        description="Cut a teacher and its data-bin down to the tokens of the given directions "
        "(special symbols and language tokens kept): the students made from them get the small "
        "vocabulary.")
    parser.add_argument("teacher", metavar="TEACHER.pt", help="stock fairseq translation Transformer")
    parser.add_argument("data", metavar="DATA", help="data-bin binarised with the teacher's dictionary")
    parser.add_argument("out", metavar="OUT", help="output directory: dictionaries, splits, teacher.pt")
    parser.add_argument("--pairs", type=pair_list, help="directions to keep, e.g. es-en,en-es (default: the teacher's)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    summary = run_cli("wd-trim-vocab", lambda: trim(
        args.teacher, args.data, args.out, args.pairs.split(",") if args.pairs else None,
        args.force))
    (s_old, s_new), (t_old, t_new) = summary["source_vocabulary"], summary["target_vocabulary"]
    print(f"wrote {args.out}: vocabulary {s_old} -> {s_new} (source), {t_old} -> {t_new} (target); "
          f"teacher parameters {summary['parameters'][0]:,} -> {summary['parameters'][1]:,}")
    user_dir = os.path.dirname(os.path.abspath(__file__))
    data, *flags = summary["phase1_flags"]
    print("next, phase 1 (these task flags replace the teacher's run's): fairseq-train "
          + " ".join(shlex.quote(f) for f in [data, *flags, "--user-dir", user_dir, "--arch", "wd_transformer"])
          + " <student shape and training flags>")


if __name__ == "__main__":
    cli_main()
