"""The recipe's ``prepare`` stage: raw text (RAW_DIR, or training archives downloaded and
checked against CHECKSUMS plus sacreBLEU's valid and test sets) -> Moses tokens -> the
training pair filter -> BPE (subword-nmt) -> ``fairseq-preprocess`` into WORK/data-bin.

Every file a step makes is written whole (a temporary file renamed) and kept by a rerun
(``stages.Command.creates``), so an interrupted prepare resumes where it stopped; the
data-bin appears at the end, in one rename. ``r``: a ``recipe_stages.Recipe``.
"""

import functools
import gzip
import os
import shutil
import sys
import tarfile
import time
import urllib.request
import zipfile
from typing import List, Optional

import recipe_tools
from wd_fairseq.distill_data import link_data
from wd_fairseq.files import sha256_file
from wd_fairseq.stages import Command, Stage
from wd_fairseq.teacher import WDSetupError


def tool(*args: str, **files) -> Command:
    """A ``recipe_tools.py`` command (``files``: Command's ``stdout``/``creates``)."""
    return Command([sys.executable, recipe_tools.__file__, *args], **files)


def prepare_stage(r) -> Stage:
    s, src, tgt = r.s, r.s["SRC"], r.s["TGT"]
    raw, tok, bpe = r.path("raw"), r.path("tok"), r.path("bpe")
    for name in r.test_sets:
        if name.startswith(("train", "valid")):
            raise WDSetupError(f"test set name {name}: fairseq would load it with train/valid splits. Fix: rename it")
    actions = [functools.partial(os.makedirs, d, exist_ok=True) for d in (raw, tok, bpe)] + raw_text(r)
    sets = ["train", s["VALID_SET"], *r.test_sets]
    inputs = {(name, lang): os.path.join(raw, f"{name}.{lang}") for name in sets for lang in (src, tgt)}
    for name in r.test_sets + [s["VALID_SET"]]:  # several references: the first is the tokens' target
        first = references(r, name, r.s["RAW_DIR"] or raw)[0]  # (RAW_DIR's: raw/ is linked to it later)
        inputs[name, tgt] = os.path.join(raw, os.path.basename(first))
    actions.append(functools.partial(require_files, sorted(inputs.values())))
    for name in sets:
        for lang in (src, tgt):
            mode = s["TOKENIZE_SRC"] if lang == src else s["TOKENIZE_TGT"]
            diacritics = ["--remove-diacritics"] if lang == "ro" and s["RO_DIACRITICS"] == "remove" else []
            out = os.path.join(tok, f"{name}.{lang}")
            actions.append(tool("tokenize", "--lang", lang, "--mode", mode, *diacritics, "--workers", s["WORKERS"],
                                inputs[name, lang], out, creates=out))
        actions.append(tool("check-aligned", *[os.path.join(tok, f"{name}.{lang}") for lang in (src, tgt)]))
    clean = os.path.join(tok, "train.clean")
    actions.append(tool("clean", "--src", os.path.join(tok, f"train.{src}"), "--tgt", os.path.join(tok, f"train.{tgt}"),
                        "--out-prefix", clean, "--src-lang", src, "--tgt-lang", tgt, "--max-len", s["CLEAN_MAX_LEN"],
                        "--ratio", s["CLEAN_RATIO"], creates=f"{clean}.{tgt}"))
    actions += learn_bpe(r, clean, bpe)
    for name in sets:
        for lang in (src, tgt):
            text = f"{clean}.{lang}" if name == "train" else os.path.join(tok, f"{name}.{lang}")
            out = os.path.join(bpe, f"{name}.{lang}")
            actions.append(Command(["subword-nmt", "apply-bpe", "-c", os.path.join(bpe, f"codes.{lang}"),
                                    "--vocabulary", os.path.join(bpe, f"vocab.{lang}"),
                                    "--vocabulary-threshold", s["BPE_VOCAB_THRESHOLD"], "--input", text],
                                   stdout=out, creates=out))
    return Stage("prepare", actions + binarise(r, bpe))


def raw_text(r) -> List:
    """WORK/raw: links to the files of RAW_DIR; or the training archives' text, and the
    valid and test sets from sacreBLEU."""
    s, raw = r.s, r.path("raw")
    if s["RAW_DIR"]:
        return [functools.partial(link_data, os.path.abspath(s["RAW_DIR"]), raw)]
    if not s["TRAIN_URLS"]:
        raise WDSetupError("no data: set RAW_DIR (local raw text) or TRAIN_URLS/TRAIN_PREFIXES")
    if len(r.test_sets) != 1:
        raise WDSetupError("downloads give one test set (SACREBLEU_TEST); set RAW_DIR for several")
    train, downloads = os.path.join(raw, f"train.{s['TGT']}"), r.path("downloads")
    actions: List = [functools.partial(fetch_archive, url, downloads, s["CHECKSUMS"], train)
                     for url in s["TRAIN_URLS"].split()]
    actions.append(tool("concat", "--src-lang", s["SRC"], "--tgt-lang", s["TGT"], "--out-prefix",
                        os.path.join(raw, "train"),
                        *[os.path.join(downloads, "extracted", p) for p in s["TRAIN_PREFIXES"].split()],
                        creates=train))
    for name, test in ((s["VALID_SET"], s["SACREBLEU_VALID"]), (r.test_sets[0], s["SACREBLEU_TEST"])):
        for side, lang in (("src", s["SRC"]), ("ref", s["TGT"])):
            out = os.path.join(raw, f"{name}.{lang}")
            actions.append(Command(["sacrebleu", "-t", test, "-l", f"{s['SRC']}-{s['TGT']}", "--echo", side],
                                   stdout=out, creates=out))
    return actions


def references(r, test_set: str, directory: str) -> List[str]:
    """The reference files of a set in ``directory``: SET.TGT, or SET.TGT0, SET.TGT1, ..."""
    one = os.path.join(directory, f"{test_set}.{r.s['TGT']}")
    if os.path.isfile(one) or r.plan:
        return [one]
    prefix = os.path.basename(one)
    numbered = [n for n in os.listdir(directory) if n.startswith(prefix) and n[len(prefix):].isdigit()] \
        if os.path.isdir(directory) else []
    if not numbered:
        return [one]  # (missing: require_files names it)
    return [os.path.join(directory, n) for n in sorted(numbered, key=lambda n: int(n[len(prefix):]))]


def require_files(paths: List[str]) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise WDSetupError(f"{path}: missing. Fix: provide {os.path.basename(path)} (see RAW_DIR in pipeline.sh; "
                               "several references as NAME.LANG0, NAME.LANG1, ...)")


def fetch_archive(url: str, downloads: str, checksums: str, unless: str) -> None:
    """Download ``url`` into ``downloads`` (3 tries, written whole), check its SHA-256
    against ``checksums`` and extract it into downloads/extracted; nothing when ``unless``
    (the concatenated training text) exists. A file without a checksum is reported and its
    sum recorded in downloads/SHA256SUMS.recorded."""
    if os.path.isfile(unless) and os.path.getsize(unless):
        return
    name = os.path.basename(url.split("?")[0])
    path, extracted = os.path.join(downloads, name), os.path.join(downloads, "extracted")
    os.makedirs(extracted, exist_ok=True)
    if not os.path.isfile(path) or not os.path.getsize(path):
        print(f"downloading {url}", flush=True)
        for attempt in range(3):
            try:
                with urllib.request.urlopen(url) as response, open(path + ".part", "wb") as out:
                    shutil.copyfileobj(response, out, 1 << 20)
                break
            except OSError as e:
                if attempt == 2:
                    raise WDSetupError(f"download of {url} failed ({e}). Fix: check the network or the URL, "
                                       "then rerun") from e
                time.sleep(5)
        os.replace(path + ".part", path)
    check_sum(path, checksums)
    marker = os.path.join(extracted, f".{name}.done")
    if not os.path.exists(marker):
        extract(path, extracted)
        open(marker, "w").close()


def check_sum(path: str, checksums: Optional[str]) -> None:
    actual, name = sha256_file(path), os.path.basename(path)
    expected = None
    if checksums and os.path.isfile(checksums):
        with open(checksums, encoding="utf-8") as f:
            expected = next((line.split()[0] for line in f if line.split()[1:2] == [name]), None)
    if expected is None:
        record = os.path.join(os.path.dirname(path), "SHA256SUMS.recorded")
        print(f"WARNING: no checksum for {name} in {checksums or 'CHECKSUMS (unset)'}; sha256 {actual} recorded "
              f"in {record}", flush=True)
        with open(record, "a", encoding="utf-8") as f:
            f.write(f"{actual}  {name}\n")
    elif expected != actual:
        raise WDSetupError(f"{path}: sha256 {actual}, expected {expected} (from {checksums}). Fix: delete the file "
                           f"and rerun (a broken download), or correct {checksums}")


def extract(path: str, directory: str) -> None:
    name = os.path.basename(path)
    if name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(path) as archive:
            # (the "data" filter, where this Python has it: no absolute paths, links out, devices)
            archive.extractall(directory, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    elif name.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            archive.extractall(directory)
    elif name.endswith(".gz"):
        with gzip.open(path, "rb") as f, open(os.path.join(directory, name[:-3]), "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
    else:
        raise WDSetupError(f"{name}: unknown archive type. Fix: use .tgz, .tar.gz, .zip or .gz URLs")


def learn_bpe(r, clean: str, bpe: str) -> List:
    """BPE codes and vocabularies per language: one joint BPE (JOINT_BPE=1) or one each."""
    s, langs = r.s, (r.s["SRC"], r.s["TGT"])
    codes = {lang: os.path.join(bpe, f"codes.{lang}") for lang in langs}
    vocab = {lang: os.path.join(bpe, f"vocab.{lang}") for lang in langs}
    if s["JOINT_BPE"] == "1":
        learned = os.path.join(bpe, "codes.tmp")
        return [Command(["subword-nmt", "learn-joint-bpe-and-vocab", "--input", *[f"{clean}.{lang}" for lang in langs],
                         "-s", s["BPE_MERGES"], "-o", learned, "--write-vocabulary", *vocab.values()],
                        creates=codes[langs[1]]),
                functools.partial(share_codes, learned, [codes[lang] for lang in langs])]
    actions: List = []
    for lang in langs:
        segmented = os.path.join(bpe, f"train.nojoint.{lang}")
        actions += [Command(["subword-nmt", "learn-bpe", "-s", s["BPE_MERGES"], "--input", f"{clean}.{lang}"],
                            stdout=codes[lang], creates=codes[lang]),
                    Command(["subword-nmt", "apply-bpe", "-c", codes[lang], "--input", f"{clean}.{lang}"],
                            stdout=segmented, creates=vocab[lang]),
                    Command(["subword-nmt", "get-vocab", "--input", segmented],
                            stdout=vocab[lang], creates=vocab[lang]),
                    functools.partial(remove, segmented)]
    return actions


def share_codes(learned: str, codes: List[str]) -> None:
    """The joint codes ``learned`` as each language's ``codes`` (the last one by rename: it
    marks the BPE done)."""
    if os.path.exists(codes[-1]):
        return
    for path in codes[:-1]:
        shutil.copyfile(learned, path)
    os.replace(learned, codes[-1])


def remove(path: str) -> None:
    if os.path.lexists(path):
        os.remove(path)


def binarise(r, bpe: str) -> List:
    """``fairseq-preprocess`` of train and valid, then of each test set on their dictionaries
    (one run per test set: ``--testpref a,b`` would make test, test1), into data-bin.tmp,
    renamed data-bin at the end."""
    s, src, tgt = r.s, r.s["SRC"], r.s["TGT"]
    building = r.data + ".tmp"
    actions: List = [functools.partial(shutil.rmtree, building, ignore_errors=True), Command([
        "fairseq-preprocess", "--source-lang", src, "--target-lang", tgt, "--trainpref", os.path.join(bpe, "train"),
        "--validpref", os.path.join(bpe, s["VALID_SET"]), "--destdir", building, "--workers", s["WORKERS"],
        *(["--joined-dictionary"] if s["JOINED_DICT"] == "1" else [])])]
    for name in r.test_sets:
        scratch = r.path(f"tmp-{name}")
        actions += [functools.partial(shutil.rmtree, scratch, ignore_errors=True), Command([
            "fairseq-preprocess", "--source-lang", src, "--target-lang", tgt, "--testpref", os.path.join(bpe, name),
            "--destdir", scratch, "--srcdict", os.path.join(building, f"dict.{src}.txt"),
            "--tgtdict", os.path.join(building, f"dict.{tgt}.txt"), "--workers", s["WORKERS"]]),
            functools.partial(move_split, scratch, "test", building, name)]
    return actions + [functools.partial(shutil.rmtree, r.data, ignore_errors=True),
                      functools.partial(os.replace, building, r.data)]


def move_split(scratch: str, split: str, destination: str, name: str) -> None:
    """The files of ``split`` in ``scratch`` into ``destination`` as split ``name``; then
    ``scratch`` removed."""
    for file in os.listdir(scratch):
        if file.startswith(split + "."):
            os.replace(os.path.join(scratch, file), os.path.join(destination, name + file[len(split):]))
    shutil.rmtree(scratch)
