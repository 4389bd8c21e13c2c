"""``wd-evaluate``: BLEU, chrF and decoding speed of translation models, and the
results table of a language pair (docs/method.md section 6).

* ``wd-evaluate score``: reads a ``fairseq-generate --remove-bpe`` log (``H-`` lines),
  Moses-detokenizes the hypotheses, and scores them against raw references:
  sacreBLEU with its signature, chrF, and tokenized BLEU after one of the
  authors' conventions (:data:`CONVENTIONS`, multi-bleu.perl equivalent). The
  log's timing line gives the decoding speed (sentences/s).
* ``wd-evaluate speed``: records the speed of separate timing runs (the median of
  their rounds) and, given the checkpoint, the architecture it decodes with.
* ``wd-evaluate table``: merges the records into one JSON and Markdown table with
  each model's speed relative to the teacher's; models of one architecture (students
  trained differently) get one speed, the median of all their rounds: their
  differences are the machine's noise, not the models'.
"""

import argparse
import json
import os
import re
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from sacrebleu.metrics import BLEU, CHRF
from sacremoses import MosesDetokenizer, MosesPunctNormalizer, MosesTokenizer

from .cli import run_cli
from .files import write_atomic
from .romanian import normalize_romanian
from .teacher import model_args

_HYPOTHESIS = re.compile(r"^H-(\d+)\t[^\t]*\t(.*)$")
_TIMING = re.compile(
    r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
    r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)"
)


class EvaluationError(ValueError):
    """Scoring cannot proceed: the message names the file and the fix."""


def read_generate_log(path: str) -> Tuple[List[str], Dict]:
    """Top hypotheses of a fairseq-generate log in corpus order, and its timing.

    Returns (hypotheses, {"sentences", "tokens", "seconds", "sentences_per_second",
    "tokens_per_second"}).
    """
    hypotheses: Dict[int, str] = {}
    timing = None
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            line = line.rstrip("\n")
            match = _HYPOTHESIS.match(line)
            if match:
                hypotheses.setdefault(int(match.group(1)), match.group(2))
                continue
            match = _TIMING.search(line)
            if match:
                values = [float(g.replace(",", "")) for g in match.groups()]
                timing = dict(zip(("sentences", "tokens", "seconds", "sentences_per_second",
                                   "tokens_per_second"), values))
    if not hypotheses or timing is None:
        raise EvaluationError(
            f"{path}: no H- lines or no 'Translated ... sentences/s' line. Fix: pass the "
            "complete output of fairseq-generate, stdout and stderr (> LOG 2>&1; did it fail "
            "or get interrupted?)"
        )
    if sorted(hypotheses) != list(range(len(hypotheses))):
        raise EvaluationError(
            f"{path}: hypothesis ids are not 0..{len(hypotheses) - 1}: sentences are missing. "
            "Fix: rerun fairseq-generate on the whole test split with "
            "--required-batch-size-multiple 1 (its default 8 can drop sentences) and without "
            "--skip-invalid-size-inputs-valid-test"
        )
    return [hypotheses[i] for i in range(len(hypotheses))], timing


def _atat(line: str) -> str:
    """Split hyphenated compounds: ``a-b`` → ``a ##AT##-##AT## b``."""
    return re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", line)


def _tokenizer(lang: str, compounds: bool = False, lower: bool = False,
               remove_diacritics: bool = False) -> Callable[[str], str]:
    """Tokenizer of one side of tokenized BLEU; the same for hypotheses and references.

    Both sides get what the recipes do to training text (examples/recipes/recipe_tools.py
    tokenize): punctuation normalisation, Romanian ş ţ -> ș ț (optionally no diacritics),
    Moses tokens; then the convention's compound splitting and lowercasing. A hypothesis
    equal to the reference's own preprocessed text therefore scores 100.
    """
    tokenizer = MosesTokenizer(lang)
    normalizer = MosesPunctNormalizer(lang)

    def tokenize(line: str) -> str:
        line = normalizer.normalize(" ".join(line.split()))
        if lang == "ro":
            line = normalize_romanian(line, remove_diacritics)
        line = tokenizer.tokenize(line, escape=False, return_str=True)
        if compounds:
            line = _atat(line)
        return line.lower() if lower else line

    return tokenize


#: Tokenized-BLEU conventions: name -> (description, tokenizer of both sides by language).
CONVENTIONS = {
    "moses": ("normalised punctuation, Moses-tokenized, case-sensitive multi-bleu",
              lambda lang: _tokenizer(lang)),
    "moses-lc": ("normalised punctuation, Moses-tokenized, case-insensitive multi-bleu -lc "
                 "(NIST Zh-En)", lambda lang: _tokenizer(lang, lower=True)),
    "ende-compound": ("normalised punctuation, Moses-tokenized, compounds split as "
                      "##AT##-##AT##, case-sensitive multi-bleu (WMT14 En-De)",
                      lambda lang: _tokenizer(lang, compounds=True)),
    "ro": ("normalised punctuation, Romanian ş ţ -> ș ț, Moses-tokenized, case-sensitive "
           "multi-bleu (WMT16 En-Ro)", lambda lang: _tokenizer(lang)),
    "ro-nodiac": ("normalised punctuation, Romanian diacritics removed, Moses-tokenized, "
                  "case-sensitive multi-bleu (WMT16 En-Ro without diacritics)",
                  lambda lang: _tokenizer(lang, remove_diacritics=True)),
}


def score(hypotheses: Sequence[str], references: Sequence[Sequence[str]], lang: str,
          convention: str) -> Dict:
    """Scores of detokenized ``hypotheses`` (N) against raw ``references`` (R lists of N)."""
    for i, ref in enumerate(references):
        if len(ref) != len(hypotheses):
            raise EvaluationError(
                f"reference {i} has {len(ref)} lines but there are {len(hypotheses)} "
                "hypotheses. Fix: pass the references of the decoded test set"
            )
    bleu = BLEU(trg_lang=lang)
    chrf = CHRF()
    description, make = CONVENTIONS[convention]
    tok = make(lang)
    tokenized = BLEU(tokenize="none", smooth_method="none", force=True)
    tok_score = tokenized.corpus_score(
        [tok(h) for h in hypotheses], [[tok(r) for r in ref] for ref in references]
    )
    return {
        "sacrebleu": round(bleu.corpus_score(list(hypotheses), [list(r) for r in references]).score, 2),
        "sacrebleu_signature": str(bleu.get_signature()),
        "chrf": round(chrf.corpus_score(list(hypotheses), [list(r) for r in references]).score, 2),
        "chrf_signature": str(chrf.get_signature()),
        "tokenized_bleu": round(tok_score.score, 2),
        "tokenized_bleu_convention": f"{convention}: {description}",
        "references": len(references),
    }


def read_lines(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: no such file. Fix: pass an existing text file")
    with open(path, encoding="utf-8", newline="\n") as f:
        text = f.read()
    # "\n" only: a reference may hold \r, \x85 or \u2028 inside a line (str.splitlines
    # and Python's default newline mode would split there); a last line needs no "\n"
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def cmd_score(args) -> Dict:
    hypotheses, timing = read_generate_log(args.generate_log)
    detok = MosesDetokenizer(args.lang)
    hypotheses = [detok.detokenize(h.split()) for h in hypotheses]
    references = [read_lines(path) for path in args.refs]
    for path, ref in zip(args.refs, references):
        if len(hypotheses) < len(ref):
            raise EvaluationError(
                f"{args.generate_log} has {len(hypotheses)} hypotheses but {path} has {len(ref)} "
                "lines: fairseq-generate left sentences out. Fix: rerun it with "
                "--required-batch-size-multiple 1 (its default 8 can drop the last sentences), "
                "or pass the references of the decoded test set"
            )
    record = {"model": args.name, "test_set": args.test_set, "target_lang": args.lang,
              **score(hypotheses, references, args.lang, args.convention),
              "sentences_per_second": timing["sentences_per_second"],
              "speed_source": os.path.basename(args.generate_log)}
    if args.hypotheses_out:
        write_atomic(args.hypotheses_out, "".join(h + "\n" for h in hypotheses))
    write_atomic(args.out, json.dumps(record, indent=2) + "\n")
    return record


#: Options of a fairseq Transformer that decide the network it decodes with.
ARCHITECTURE_FIELDS = (
    "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads",
    "decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads",
    "encoder_normalize_before", "decoder_normalize_before", "activation_fn",
    "share_decoder_input_output_embed", "share_all_embeddings",
)


def architecture_of(checkpoint: str) -> Optional[str]:
    """The network a fairseq checkpoint decodes with, as a string: the shape options of
    its config and the sizes of its token tables (tensors memory-mapped, not read);
    None where the config lacks a shape option."""
    try:
        try:
            state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # a checkpoint of torch < 1.6 (not zip): no mmap
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise EvaluationError(f"{checkpoint}: cannot be read ({e}). Fix: pass the checkpoint "
                              "the timing runs decoded with") from e
    args = model_args(state)
    values = [args.get(field) for field in ARCHITECTURE_FIELDS]
    if any(v is None for v in values[:8]):
        return None
    tables = [tuple(state["model"][k].shape) for k in ("encoder.embed_tokens.weight",
                                                        "decoder.embed_tokens.weight")
              if k in state["model"]]
    return ",".join(f"{f}={v}" for f, v in zip(ARCHITECTURE_FIELDS, values)) + f",tables={tables}"


def cmd_speed(args) -> Dict:
    rounds = [read_generate_log(log)[1]["sentences_per_second"] for log in args.generate_log]
    record = {"model": args.name, "test_set": args.test_set,
              "sentences_per_second": statistics.median(rounds),
              "rounds_sentences_per_second": rounds,
              "speed_source": ", ".join(os.path.basename(log) for log in args.generate_log)}
    if args.checkpoint:
        record["architecture"] = architecture_of(args.checkpoint)
    write_atomic(args.out, json.dumps(record, indent=2) + "\n")
    return record


def share_speeds(rows: List[Dict]) -> List[str]:
    """Give rows of one architecture and test set one speed, the median of all their
    rounds (in place); returns a line per such group for the table's notes."""
    groups: Dict[Tuple[str, str], List[Dict]] = {}
    for row in rows:
        if row.get("architecture") and row.get("rounds_sentences_per_second"):
            groups.setdefault((row["architecture"], row["test_set"]), []).append(row)
    notes = []
    for group in groups.values():
        if len(group) < 2:
            continue
        rounds = [s for row in group for s in row["rounds_sentences_per_second"]]
        names = [row["model"] for row in group]
        for row in group:
            row["sentences_per_second"] = round(statistics.median(rounds), 2)
            row["speed_shared_with"] = names
        notes.append(f"{', '.join(names)} ({group[0]['test_set']}) have one architecture: one speed, "
                     f"the median of their {len(rounds)} timing runs")
    return notes


def results_table(records: List[Dict], teacher: str, title: str,
                  notes: Sequence[str] = ()) -> Tuple[Dict, str]:
    """(JSON document, Markdown) of the records, with speed relative to ``teacher``;
    ``notes`` (how the models were made) end the Markdown and go into the JSON."""
    merged: Dict[Tuple[str, str], Dict] = {}
    for record in records:
        merged.setdefault((record["model"], record["test_set"]), {}).update(record)
    rows = list(merged.values())
    shared = share_speeds(rows)
    for row in rows:
        base = merged.get((teacher, row["test_set"]), {}).get("sentences_per_second")
        speed = row.get("sentences_per_second")
        row["speedup_vs_teacher"] = round(speed / base, 2) if speed and base else None
    columns = [("model", "model"), ("test_set", "test set"), ("sacrebleu", "sacreBLEU"),
               ("tokenized_bleu", "tok. BLEU"), ("chrf", "chrF"),
               ("sentences_per_second", "sent/s"), ("speedup_vs_teacher", "speed vs teacher")]
    lines = [f"# {title}", "", "| " + " | ".join(h for _, h in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            cells.append("-" if value is None else (f"{value}x" if key == "speedup_vs_teacher"
                                                    else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    signatures = sorted({(r.get("sacrebleu_signature"), r.get("chrf_signature"),
                          r.get("tokenized_bleu_convention")) for r in rows if "sacrebleu" in r})
    lines.append("")
    for sacre, chrf, tok in signatures:
        lines += [f"- sacreBLEU signature: `{sacre}`", f"- chrF signature: `{chrf}`",
                  f"- tokenized BLEU: {tok}"]
    speeds = sorted({r["speed_source"] for r in rows if "speed_source" in r})
    if speeds:
        lines.append(f"- speed: sentences/s of fairseq-generate, median of the timing runs "
                     f"({'; '.join(speeds)})")
    lines += [f"- speed: {note}" for note in shared]
    lines += [f"- {note}" for note in notes]
    document = {"title": title, "teacher": teacher, "rows": rows, "notes": list(notes)}
    return document, "\n".join(lines) + "\n"


def cmd_table(args):
    records = []
    for path in args.records:
        with open(path, encoding="utf-8") as f:
            records.append(json.load(f))
        if "model" not in records[-1] or "test_set" not in records[-1]:
            raise EvaluationError(f"{path}: not a wd-evaluate record. Fix: pass score/speed outputs")
    document, markdown = results_table(records, args.teacher, args.title, args.note)
    write_atomic(args.json, json.dumps(document, indent=2) + "\n")
    write_atomic(args.markdown, markdown)
    return markdown


def cli_main(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(prog="wd-evaluate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="BLEU/chrF (+speed) of a fairseq-generate --remove-bpe log")
    p.add_argument("--generate-log", required=True,
                   help="output of fairseq-generate --remove-bpe: stdout and stderr (> LOG 2>&1)")
    p.add_argument("--refs", required=True, nargs="+", help="raw reference file(s), one per reference")
    p.add_argument("--lang", required=True, help="target language (Moses and sacreBLEU rules)")
    p.add_argument("--convention", choices=sorted(CONVENTIONS), default="moses",
                   help="tokenized BLEU convention (default: moses)")
    p.add_argument("--name", required=True, help="model name in the table (e.g. teacher)")
    p.add_argument("--test-set", default="test", help="test set name in the table")
    p.add_argument("--hypotheses-out", help="write the detokenized hypotheses here")
    p.add_argument("--out", required=True, help="record (JSON) to write")
    p.set_defaults(run=cmd_score)
    p = sub.add_parser("speed", help="record the speed of fairseq-generate timing runs (median)")
    p.add_argument("--generate-log", required=True, nargs="+",
                   help="fairseq-generate output (stdout and stderr) of each timing run")
    p.add_argument("--checkpoint", help="the checkpoint decoded: models of one architecture "
                   "then share one speed in the table")
    p.add_argument("--name", required=True)
    p.add_argument("--test-set", default="test")
    p.add_argument("--out", required=True, help="record (JSON) to write")
    p.set_defaults(run=cmd_speed)
    p = sub.add_parser("table", help="results table (JSON + Markdown) of records")
    p.add_argument("records", nargs="+", help="records of score/speed (later ones win)")
    p.add_argument("--teacher", default="teacher", help="model name speeds are relative to")
    p.add_argument("--title", default="Results")
    p.add_argument("--json", required=True)
    p.add_argument("--markdown", required=True)
    p.add_argument("--note", action="append", default=[],
                   help="a line on how the models were made (repeatable)")
    p.set_defaults(run=cmd_table)
    args = parser.parse_args(argv)
    result = run_cli(f"wd-evaluate {args.command}", lambda: args.run(args), (EvaluationError,))
    print(result if isinstance(result, str) else json.dumps(result, indent=2))


if __name__ == "__main__":
    cli_main()
