"""Q3: decoding speed of the teacher, stu1 and stu2, and of their CTranslate2 exports.

fairseq rows run ``fairseq-generate`` on the same test set for each beam and batch
size, and report its own generation time (``Translated ... in Xs``: decoding only, no
loading). CTranslate2 rows decode the same sentences with ``translate_batch`` (same
beam, ``max_batch_size`` sentences per batch, same thread count) from
``wd-export-ct2`` exports. The weights are random, so every hypothesis is pinned to
the same length (fairseq ``--min-len L --max-len-b L``, CTranslate2
``min/max_decoding_length L``): all models decode the same number of tokens, and
speed-ups compare the cost per token, as for trained models of similar output
length. Runs alternate between models; with repeats, the fastest run counts.
The paper reports 1.88-2.94x for its students over the teacher.

On a GPU, fairseq decodes in fp16 and CTranslate2 computes in float16 and
int8_float16. Where CTranslate2 cannot run (not installed, or its build finds no
usable GPU), its rows are left out and the JSON says why.
"""

import argparse
import time

from common import (assets_of, add_common_args, environment, fairseq_device_flags,
                    generation_seconds, print_table, read_split, resolve_device, run,
                    use_threads, write_results)

LENGTH = 30
FAIRSEQ_MODELS = ("teacher", "stu1", "stu2")
CT2_MODELS = (("teacher", "int8"), ("stu1", "int8"), ("stu1", "float16"),
              ("stu2", "int8"), ("stu2", "float16"))
#: CTranslate2 compute type on a GPU for each export's quantization (CPU: the export's).
CT2_GPU_COMPUTE = {"int8": "int8_float16", "float16": "float16"}


def parse_configs(text: str):
    """``"6x16,1x1"`` -> [(6, 16), (1, 1)]: beam x batch size."""
    try:
        configs = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        configs = []
    if not configs or any(len(c) != 2 or min(c) < 1 for c in configs):
        raise argparse.ArgumentTypeError(
            f"--configs {text!r}: expected BEAMxBATCH items separated by commas, e.g. 6x16,1x1")
    return configs


def fairseq_run(assets, name, split, beam, batch_size, device, env) -> dict:
    out = run(["fairseq-generate", assets.data(), "--path", assets.stock(name),
               "--gen-subset", split, "--beam", beam, "--batch-size", batch_size,
               "--min-len", LENGTH, "--max-len-a", "0", "--max-len-b", LENGTH,
               "--required-batch-size-multiple", "1", *fairseq_device_flags(device)], env=env)
    return generation_seconds(out.stdout + out.stderr)


def ct2_run(translator, sources, beam, batch_size) -> dict:
    start = time.perf_counter()
    results = translator.translate_batch(
        sources, beam_size=beam, max_batch_size=batch_size, batch_type="examples",
        min_decoding_length=LENGTH, max_decoding_length=LENGTH,
        suppress_sequences=[["<blank>"]],  # fairseq never emits <pad>
    )
    seconds = time.perf_counter() - start
    tokens = sum(len(r.hypotheses[0]) + 1 for r in results)  # + EOS, as fairseq counts
    return {"sentences": len(results), "tokens": tokens, "seconds": seconds}


def ct2_translators(assets, device: str, threads: int):
    """({(model, quantization): Translator}, None), or ({}, why CTranslate2 cannot run)."""
    try:
        import ctranslate2
    except ImportError as error:
        return {}, f"ctranslate2 is not installed ({error})"
    if device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
        return {}, (f"ctranslate2 {ctranslate2.__version__} sees no CUDA device "
                    "(its wheel's CUDA build does not match this machine's)")
    translators = {}
    try:
        for name, quant in CT2_MODELS:
            compute = CT2_GPU_COMPUTE[quant] if device == "cuda" else "default"
            translators[(name, quant)] = ctranslate2.Translator(
                str(assets.ct2(name, quant)), device=device, compute_type=compute,
                intra_threads=threads, inter_threads=1)
    except RuntimeError as error:  # e.g. a CUDA library its build needs is missing
        return {}, f"ctranslate2 {ctranslate2.__version__} cannot decode on {device}: {error}"
    return translators, None


def main():
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--repeats", type=int, help="runs per row, fastest kept "
                        "(default: 1 with --quick, else 2)")
    parser.add_argument("--split", choices=("valid", "test"),
                        help="sentences to decode: valid (48) or test (480); "
                        "default: valid with --quick, else test")
    parser.add_argument("--configs", type=parse_configs,
                        help="BEAMxBATCH list (default: 6x16,1x16 with --quick, "
                        "else 6x1,6x16,6x64,1x1,1x16,1x64)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    env = use_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 2)
    split = args.split or ("valid" if args.quick else "test")
    configs = args.configs or ([(6, 16), (1, 16)] if args.quick
                               else [(beam, bs) for beam in (6, 1) for bs in (1, 16, 64)])
    assets = assets_of(args)
    sources = read_split(assets.data(), split, "src")
    translators, ct2_skipped = ct2_translators(assets, device, args.threads)
    if ct2_skipped:
        print(f"[decoding_speed] CTranslate2 rows left out: {ct2_skipped}", flush=True)
    rows = []
    for beam, batch_size in configs:
        best = {}
        for _ in range(repeats):
            for name in FAIRSEQ_MODELS:
                result = fairseq_run(assets, name, split, beam, batch_size, device, env)
                key = (name, "fairseq", "fp32" if device == "cpu" else "fp16")
                if key not in best or result["seconds"] < best[key]["seconds"]:
                    best[key] = result
            for (name, quant), translator in translators.items():
                result = ct2_run(translator, sources, beam, batch_size)
                key = (name, "ctranslate2", f"{quant} (runs {translator.compute_type})")
                if key not in best or result["seconds"] < best[key]["seconds"]:
                    best[key] = result
        teacher = best[("teacher", "fairseq", "fp32" if device == "cpu" else "fp16")]
        for (name, engine, weights), result in best.items():
            assert result["tokens"] == teacher["tokens"], f"{name} {engine}: lengths differ"
            rows.append({
                "model": name, "engine": engine, "weights": weights, "beam": beam,
                "batch_size": batch_size, "sentences": result["sentences"],
                "tokens": result["tokens"], "seconds": result["seconds"],
                "sentences_per_s": result["sentences"] / result["seconds"],
                "speedup_vs_fairseq_teacher": teacher["seconds"] / result["seconds"],
            })
        print(f"[beam {beam} batch {batch_size}] done", flush=True)
    ct2_version = None
    if translators:
        import ctranslate2

        ct2_version = ctranslate2.__version__
    results = {"benchmark": "decoding_speed", "mode": "quick" if args.quick else "full",
               "pinned_length": LENGTH, "split": split, "repeats": repeats,
               "configs": [f"{beam}x{bs}" for beam, bs in configs],
               "environment": environment(device) | {"ctranslate2": ct2_version},
               "ctranslate2_skipped": ct2_skipped, "rows": rows}
    path = write_results(args, "decoding_speed", results)
    print_table(rows, ["model", "engine", "weights", "beam", "batch_size", "sentences",
                       "seconds", "sentences_per_s", "speedup_vs_fairseq_teacher"])
    print(f"\nwall seconds of decoding only, {args.threads} thread(s). Results: {path}")


if __name__ == "__main__":
    main()
