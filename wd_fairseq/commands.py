"""The command lines that ``wd-distill`` (``distill.py``) and the recipes
(``examples/recipes/recipe_stages.py``) both run: the learning-rate curve, KD data,
decoding a test split and scoring it. Each returns an argv list or a ``stages.Command``."""

from typing import List, Optional, Sequence, Tuple

from .stages import Command


def learning_rate_flags(lr: float, warmup: int, offset: Optional[int] = None) -> List[str]:
    """Adam (0.9, 0.98) on inverse_sqrt: ``warmup`` updates from 1e-7 up to ``lr``, then
    lr·sqrt(warmup/update) (the authors'). With ``offset``, the same curve from update
    ``offset`` on (wd_fairseq's ``inverse_sqrt_offset``: phase 2 going on along phase 1's
    curve; the caller adds ``--user-dir``)."""
    scheduler = "inverse_sqrt" if offset is None else "inverse_sqrt_offset"
    flags = ["--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", str(lr),
             "--lr-scheduler", scheduler, "--warmup-init-lr", "1e-7", "--warmup-updates", str(warmup)]
    return flags if offset is None else flags + ["--update-offset", str(offset)]


def kd_data_command(kd_bin: str, teacher: str, direction: Tuple[str, str], beam: int,
                    flags: Sequence[str] = ()) -> Command:
    """``wd-kd-data``: the teacher's beam-``beam`` translations of ``kd_bin``'s train split
    as its split ``train1``; ``flags``: any other ``wd-kd-data`` flags."""
    return Command(["wd-kd-data", kd_bin, "--teacher-path", teacher, "-s", direction[0],
                    "-t", direction[1], "--beam", str(beam), *flags])


def generate_command(data: str, checkpoint: str, direction: Tuple[str, str], subset: str,
                     output: str, beam: int, flags: Sequence[str] = ()) -> Command:
    """``fairseq-generate`` of ``checkpoint`` on split ``subset``, stdout and stderr (its
    "Translated" line) into ``output``; ``flags``: task, length, batch and device flags.
    ``--required-batch-size-multiple 1``: with fairseq-fixed 0.12.3.1 any larger multiple
    silently drops the last, smaller batch (up to 7 sentences of a test set)."""
    return Command(["fairseq-generate", data, "--path", checkpoint, "--gen-subset", subset,
                    "-s", direction[0], "-t", direction[1], "--beam", str(beam), "--remove-bpe",
                    "--required-batch-size-multiple", "1", *flags], output=output)


def score_command(generate_log: str, refs: Sequence[str], lang: str, name: str, test_set: str,
                  out_prefix: str, convention: Optional[str] = None) -> Command:
    """``wd-evaluate score`` of a ``fairseq-generate`` log against raw references:
    ``OUT_PREFIX.json`` (sacreBLEU with signature, chrF, speed) and ``OUT_PREFIX.hyp``."""
    return Command(["wd-evaluate", "score", "--generate-log", generate_log, "--refs", *refs,
                    "--lang", lang, *(["--convention", convention] if convention else []),
                    "--name", name, "--test-set", test_set,
                    "--hypotheses-out", out_prefix + ".hyp", "--out", out_prefix + ".json"])
