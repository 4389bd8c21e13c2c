"""KD-data speed and memory: ``wd-kd-data`` with each engine on the same corpus.

For each corpus size (the training split repeated ``--repeat`` times) and engine
(CPU: fairseq, CTranslate2 float32 and int8 with ``--threads``; GPU, ``--device cuda``:
fairseq fp16, CTranslate2 float16 and int8_float16 on every visible GPU) this runs
``wd-kd-data`` from scratch in its own process and records wall time, decoding
sentences/s (``summary.json``), peak RSS (``wait4``) and fallback counts; ratios are
taken against the fairseq engine of the same size, in the same run. ``--chunks K``
decodes the split in K consecutive chunks, every engine on one chunk before the next,
so that a shared machine's drifting speed (this project's 2-core VMs vary by a third
over minutes) slows every engine alike; rows then sum the chunks and list each chunk's
ratio. JSON goes to
``WORKDIR/results/kd_data_speed*.json``, a table to stdout.

Corpus and teacher:

* ``--data DATA --teacher-path TEACHER.pt``: yours (e.g. the Bible demo's data-bin and
  teacher);
* ``--toy``: the test suite's toy corpus (1,200 pairs of random words, reversed and
  mapped) and its tiny trained teacher, built in WORKDIR: fast, for memory scaling;
* neither: the shared benchmark assets (``common.Assets``: a random-weight teacher of
  the authors' size, 512 random sentences); random weights run most hypotheses to the
  length limit, so both engines do the same (maximal) work per sentence.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import common
from common import REPO, BenchmarkError, print_table, run

#: engine[:precision] measured by default, by device (fairseq:fp16 is --fp16).
ENGINES = {"cpu": ("fairseq", "ctranslate2:float32", "ctranslate2:int8"),
           "cuda": ("fairseq:fp16", "ctranslate2:float16", "ctranslate2:int8_float16")}


def engine_flags(spec: str, device: str, threads: int) -> list:
    """wd-kd-data flags of ``engine[:precision]`` on ``device``."""
    engine, _, precision = spec.partition(":")
    flags = ["--engine", engine] + (["--cpu", "--threads", threads] if device == "cpu" else [])
    if engine == "fairseq" and precision:
        if precision != "fp16":
            raise BenchmarkError(f"{spec}: the fairseq engine's only precision flag is fp16")
        if device == "cpu":
            raise BenchmarkError(f"{spec}: fp16 decoding needs --device cuda")
        return flags + ["--fp16"]
    return flags + (["--quantization", precision] if precision else [])


def repeated_bin(data: Path, split: str, times: int, dest: Path, limit: int = 0,
                 start: int = 0) -> Path:
    """``dest``: links to every file of ``data`` except ``split``, which is ``split``
    (its sentences ``start`` to ``start + limit`` if ``limit`` is given) repeated
    ``times`` times (both sides)."""
    from fairseq.data import indexed_dataset

    if (dest / "done").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for path in data.iterdir():
        if path.is_file() and not path.name.startswith(f"{split}."):
            os.symlink(path.resolve(), dest / path.name)
    for idx in data.glob(f"{split}.*.idx"):
        prefix = str(idx)[:-len(".idx")]
        index = indexed_dataset.MMapIndexedDataset.Index(str(idx))
        builder = indexed_dataset.MMapIndexedDatasetBuilder(
            str(dest / (Path(prefix).name + ".bin")), dtype=index.dtype)
        dataset = indexed_dataset.MMapIndexedDataset(prefix)
        for _ in range(times):
            if limit or start:
                for i in range(start, min(start + (limit or len(dataset)), len(dataset))):
                    builder.add_item(dataset[i])
            else:
                builder.merge_file_(prefix)
        builder.finalize(str(dest / (Path(prefix).name + ".idx")))
    (dest / "done").write_text("")
    return dest


def toy_assets(workdir: Path):
    """The test suite's toy corpus, data-bin and post-norm teacher (built once)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import preprocess, train_teacher, write_toy_corpus

    root = workdir / "toy"
    data, teacher = root / "data-bin", root / "teacher" / "checkpoint_last.pt"
    if not teacher.exists():
        print(f"[assets] building the toy corpus and teacher in {root}", flush=True)
        shutil.rmtree(root, ignore_errors=True)
        write_toy_corpus(root / "raw")
        preprocess(root / "raw", data)
        train_teacher(data, root / "teacher")
    return data, teacher


def bare_ctranslate2(copy: Path, quantization: str, threads: int, beam: int,
                     max_tokens: int) -> dict:
    """CTranslate2's own speed on the same sentences: one bare ``translate_batch`` with the
    model ``wd-kd-data`` just converted (CPU; sorted by length, batches of ``max_tokens``
    source tokens, one one-thread translator per thread as in ``wd-kd-data``), which shows
    what ``wd-kd-data`` adds. One length limit serves all
    sentences (the longest source's): fair for a trained teacher, whose hypotheses end on
    their own; with random weights every hypothesis runs to it, so the bare run does more."""
    import ctranslate2
    from fairseq.data import Dictionary, indexed_dataset

    sides = {idx.name.split(".")[2]: idx for idx in copy.glob("train.*-*.*.idx")}
    pair = next(iter(sides.values())).name.split(".")[1]
    source = pair.split("-")[0]
    dataset = indexed_dataset.MMapIndexedDataset(str(sides[source])[:-len(".idx")])
    dictionary = Dictionary.load(str(copy / f"dict.{source}.txt"))
    tokens = sorted(([dictionary[t] for t in dataset[i][:-1].tolist()] for i in range(len(dataset))),
                    key=len)
    translator = ctranslate2.Translator(str(copy / "kd-train1" / f"ct2-{quantization}"),
                                        device="cpu", compute_type=quantization,
                                        inter_threads=threads, intra_threads=1)
    start = time.perf_counter()
    translator.translate_batch(tokens, max_batch_size=max_tokens, batch_type="tokens",
                               beam_size=beam, max_decoding_length=2 * len(tokens[-1]) + 13,
                               return_scores=True)
    seconds = time.perf_counter() - start
    return {"sentences": len(tokens), "engine": f"bare ctranslate2:{quantization}",
            "runs": translator.compute_type, "seconds": round(seconds, 1),
            "sentences_per_second": round(len(tokens) / seconds, 2)}


def chunk_bins(data: Path, split: str, sentences: int, chunks: int, dest: Path) -> list:
    """The first ``sentences`` of ``split`` in ``chunks`` consecutive data-bins
    ``DEST-chunkCofK`` (:func:`repeated_bin`), their sizes at most one sentence apart."""
    starts = [c * sentences // chunks for c in range(chunks + 1)]
    return [repeated_bin(data, split, 1, dest.with_name(f"{dest.name}-chunk{c + 1}of{chunks}"),
                         starts[c + 1] - starts[c], starts[c]) for c in range(chunks)]


#: What caps each engine's vector kernels at AVX2 on a CPU with AVX-512: oneDNN (CTranslate2's
#: int8 GEMM on AMD, some of PyTorch's ops), CTranslate2's own kernels, PyTorch's ATen
#: kernels, MKL (PyTorch's float32 GEMM).
AVX2_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "CT2_FORCE_CPU_ISA": "AVX2",
            "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def decode(copy: Path, teacher: Path, spec: str, device: str, args, env: dict) -> dict:
    """One from-scratch ``wd-kd-data`` run of ``spec`` on the training split of ``copy``."""
    shutil.rmtree(copy / "kd-train1", ignore_errors=True)
    for old in copy.glob("train1.*"):
        old.unlink()
    flags = engine_flags(spec, device, args.threads) + [
        "--beam", args.beam, "--max-tokens", args.max_tokens]
    try:
        result = run(["wd-kd-data", copy, "--teacher-path", teacher, *flags], env=env)
    except BenchmarkError as error:  # e.g. CTranslate2 without its CUDA libraries
        print(f"{spec}: failed; recorded, the other engines still run", flush=True)
        return {"sentences": None, "engine": spec, "error": str(error)[-600:]}
    summary = json.loads((copy / "kd-train1" / "summary.json").read_text())
    return {
        "sentences": summary["sentences"], "engine": spec,
        "runs": summary["quantization"], "devices": len(summary["devices"]),
        "seconds": round(result.seconds, 1), "decode_seconds": summary["decode_seconds"],
        "sentences_per_second": summary["sentences_per_second"],
        "peak_rss_mib": round(result.peak_rss_mib, 1),
        "fallback": summary["fallback_to_reference"],
    }


def sum_chunks(chunks: list) -> dict:
    """One engine's row over the chunks of a corpus: sentences, seconds and fallbacks
    add up, sentences/s is total sentences over total decoding seconds, peak RSS the
    largest; with several chunks, each chunk's sentences/s too."""
    if len(chunks) == 1 or any("error" in c for c in chunks):
        return next((c for c in chunks if "error" in c), chunks[0])
    row = dict(chunks[0])
    for key in ("sentences", "fallback"):
        if key in row:
            row[key] = sum(c[key] for c in chunks)
    for key in ("seconds", "decode_seconds"):
        if key in row:
            row[key] = round(sum(c[key] for c in chunks), 1)
    row["sentences_per_second"] = round(row["sentences"] / row.get("decode_seconds", row["seconds"]), 2)
    if "peak_rss_mib" in row:
        row["peak_rss_mib"] = max(c["peak_rss_mib"] for c in chunks)
    row["chunk_sentences_per_second"] = [c["sentences_per_second"] for c in chunks]
    return row


def main():
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--data", type=Path, help="fairseq data-bin with a training split")
    parser.add_argument("--teacher-path", type=Path, help="its teacher checkpoint")
    parser.add_argument("--toy", action="store_true", help="the test suite's toy corpus and teacher")
    parser.add_argument("--repeat", type=int, nargs="+", default=[1],
                        help="corpus sizes, as repetitions of the training split (default: 1)")
    parser.add_argument("--sentences", type=int,
                        help="first repeat the split up to about this many sentences (e.g. 28000)")
    parser.add_argument("--limit", type=int, default=0,
                        help="only the first N sentences of the split (before repeating)")
    parser.add_argument("--engines", nargs="+",
                        help="engine[:precision] (default: "
                        + "; ".join(f"{d}: {' '.join(e)}" for d, e in ENGINES.items()) + ")")
    parser.add_argument("--bare", metavar="QUANT",
                        help="CPU: also time a bare CTranslate2 translate_batch of the same "
                        "sentences with the model the ctranslate2:QUANT run converted")
    parser.add_argument("--chunks", type=int, default=1,
                        help="decode the split in this many consecutive chunks, every engine on "
                        "a chunk before the next chunk (in alternating order): on a machine whose "
                        "speed drifts, every engine sees the same drift (default: 1)")
    parser.add_argument("--cap-isa-avx2", action="store_true",
                        help="CPU: run every engine as on an AVX2-only CPU (no AVX-512, no VNNI) "
                        f"by capping its libraries ({' '.join(f'{k}={v}' for k, v in AVX2_CAP.items())})")
    parser.add_argument("--beam", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=4096)
    args = parser.parse_args()
    device = common.resolve_device(args.device)
    engines = args.engines or ENGINES[device]
    if args.chunks < 1:
        raise BenchmarkError(f"--chunks {args.chunks}: must be at least 1")
    if args.chunks > 1 and (args.sentences or args.repeat != [1]):
        raise BenchmarkError("--chunks times the split itself; peak RSS at other corpus sizes "
                             "needs whole runs. Fix: drop --repeat/--sentences, or --chunks")
    if (args.data is None) != (args.teacher_path is None):
        raise BenchmarkError("pass both --data and --teacher-path, or neither")
    if args.workdir is None and (args.data or args.toy):
        args.workdir = REPO / "work" / "bench"
    if args.data:
        data, teacher, corpus = args.data, args.teacher_path, "user"
    elif args.toy:
        data, teacher = toy_assets(args.workdir)
        corpus = "toy"
    else:
        assets = common.assets_of(args)
        data, teacher, corpus = assets.data(), assets.teacher(), "random-teacher"
    from fairseq.data import indexed_dataset

    src_idx = sorted(data.glob("train.*-*.*.idx"))[0]
    base = len(indexed_dataset.MMapIndexedDataset.Index(str(src_idx)))
    base = min(base, args.limit) if args.limit else base
    unit = max(1, round(args.sentences / base)) if args.sentences else 1
    if args.chunks > base:
        raise BenchmarkError(f"--chunks {args.chunks}: the split has only {base} sentences. "
                             "Fix: pass at most that many chunks")
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.cap_isa_avx2:
        if device != "cpu":
            raise BenchmarkError("--cap-isa-avx2: for --device cpu")
        env |= AVX2_CAP
        os.environ.update(AVX2_CAP)  # the bare CTranslate2 run, in this process

    rows = []
    for times in args.repeat:
        name = f"{corpus}-x{unit * times}" + (f"-first{args.limit}" if args.limit else "")
        if args.chunks == 1:
            parts = [repeated_bin(data, "train", unit * times, args.workdir / "kd_data_speed" / name,
                                  args.limit)]
        else:
            parts = chunk_bins(data, "train", base, args.chunks, args.workdir / "kd_data_speed" / name)
        chunk_rows = {spec: [] for spec in engines}
        bare = []
        for c, part in enumerate(parts):
            for spec in engines if c % 2 == 0 else engines[::-1]:
                chunk_rows[spec].append(decode(part, teacher, spec, device, args, env))
                print(f"[chunk {c + 1}/{len(parts)}] {chunk_rows[spec][-1]}", flush=True)
                if (args.bare and spec == f"ctranslate2:{args.bare}" and device == "cpu"
                        and "error" not in chunk_rows[spec][-1]):
                    bare.append(bare_ctranslate2(part, args.bare, args.threads, args.beam,
                                                 args.max_tokens))
                    print(f"[chunk {c + 1}/{len(parts)}] {bare[-1]}", flush=True)
        rows += [sum_chunks(chunk_rows[spec]) for spec in engines] + ([sum_chunks(bare)] if bare else [])
    for row in (r for r in rows if "error" not in r):
        fairseq = [r for r in rows if r["sentences"] == row["sentences"] and "error" not in r
                   and r["engine"].startswith("fairseq")]
        if fairseq:
            row["speed_vs_fairseq"] = round(row["sentences_per_second"]
                                            / fairseq[0]["sentences_per_second"], 2)
            if args.chunks > 1:
                row["chunk_speed_vs_fairseq"] = [
                    round(mine / theirs, 2) for mine, theirs in
                    zip(row["chunk_sentences_per_second"], fairseq[0]["chunk_sentences_per_second"])]
    info = common.environment(device) | {"load_average_at_end": os.getloadavg(),
                                        "isa_cap": AVX2_CAP if args.cap_isa_avx2 else None,
                                        "cpu_flags": _isa_flags()}
    results = {"command": " ".join(["python"] + sys.argv), "corpus": corpus, "teacher": str(teacher),
               "threads": args.threads, "beam": args.beam, "environment": info, "rows": rows}
    path = common.write_results(args, "kd_data_speed" + ("" if corpus == "user" else f"-{corpus}"),
                                results)
    print_table(rows, ["sentences", "engine", "runs", "devices", "seconds", "sentences_per_second",
                       "speed_vs_fairseq", "peak_rss_mib", "fallback"]
                + (["chunk_speed_vs_fairseq"] if args.chunks > 1 else []))
    print(f"wrote {path}")


def _isa_flags() -> str:
    """The vector extensions of this CPU that int8 kernels depend on (lscpu flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(sorted(f for f in flags if f.startswith("avx") or "vnni" in f))


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as e:
        sys.exit(f"kd_data_speed: error: {e}")
