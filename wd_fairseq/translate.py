"""``wd-translate``: raw text in, raw text out, with a fairseq checkpoint or a CTranslate2
model directory (``wd-export-ct2``).

Each line goes through what this project's recipes do to their data, then back:

* in: whitespace runs to one space, Moses punctuation normalisation (and Romanian
  cedilla letters to comma-below) and Moses tokenization with aggressive dash splits,
  unescaped (``--tokenizer none`` skips both); then the subword model: BPE codes
  (subword-nmt, with the vocabulary filter of ``apply-bpe --vocabulary``) or a
  SentencePiece model;
* decoded by ``wd-kd-data``'s engines (:mod:`~wd_fairseq.kd_decoding`: beam, length
  penalty, fairseq's length limit), batches of one source length;
* out: subwords joined, Moses-detokenized, as ``wd-evaluate`` scores hypotheses.

Empty lines stay empty, and the output has the input's order. A line longer than the
model accepts is refused before any decoding, naming its number.
"""

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

import numpy as np
import torch
from fairseq.data import Dictionary, ListDataset, data_utils

from .arguments import finite_float, nonnegative_float, positive_int
from .cli import run_cli
from .evaluation import read_lines
from .files import write_atomic
from .kd_decoding import CTranslate2Engine, FairseqEngine, batch_plan, cpu_threads
from .multilingual import NO_LANG_TOKENS, data_task, lang_tokens
from .romanian import normalize_romanian
from .teacher import WDSetupError, load_teacher, read_checkpoint, task_langs

logger = logging.getLogger("wd_fairseq.translate")

#: What ``wd-export-ct2`` records next to a CTranslate2 model (languages, max positions).
CT2_METADATA = "wd_fairseq.json"


class TextCodec:
    """Raw text <-> the model's subword tokens, as the recipes prepare data."""

    def __init__(self, source_lang: str, target_lang: str, tokenizer: str = "moses",
                 bpe_codes: Optional[str] = None, bpe_vocabulary: Optional[str] = None,
                 bpe_vocabulary_threshold: int = 50, sentencepiece: Optional[str] = None):
        from sacremoses import MosesDetokenizer, MosesPunctNormalizer, MosesTokenizer

        self.source_lang, self.tokenizer = source_lang, tokenizer
        self.normalizer, self.moses = MosesPunctNormalizer(source_lang), MosesTokenizer(source_lang)
        self.detokenizer = MosesDetokenizer(target_lang)
        self.bpe = self.spm = None
        if bpe_codes:
            from subword_nmt.apply_bpe import BPE, read_vocabulary

            vocabulary = None
            if bpe_vocabulary:
                with open(bpe_vocabulary, encoding="utf-8") as f:
                    vocabulary = read_vocabulary(f, bpe_vocabulary_threshold)
            with open(bpe_codes, encoding="utf-8") as f:
                self.bpe = BPE(f, vocab=vocabulary)
        elif sentencepiece:
            try:
                import sentencepiece as spm
            except ImportError as e:
                raise WDSetupError("--sentencepiece needs the sentencepiece package. "
                                   "Fix: pip install sentencepiece") from e
            self.spm = spm.SentencePieceProcessor(model_file=sentencepiece)

    def encode(self, line: str) -> List[str]:
        text = " ".join(line.split())
        if self.tokenizer == "moses":
            text = self.normalizer.normalize(text)
            if self.source_lang == "ro":
                text = normalize_romanian(text)
            text = self.moses.tokenize(text, escape=False, aggressive_dash_splits=True, return_str=True)
        if self.bpe is not None:
            return self.bpe.process_line(text).split()
        if self.spm is not None:
            return self.spm.encode(text, out_type=str)
        return text.split()

    def decode(self, tokens: List[str]) -> str:
        if self.bpe is not None:
            text = (" ".join(tokens) + " ").replace("@@ ", "").strip()
        elif self.spm is not None:
            text = self.spm.decode(tokens)
        else:
            text = " ".join(tokens)
        return self.detokenizer.detokenize(text.split()) if self.tokenizer == "moses" else text


def ct2_vocabulary(model_dir: str) -> Dictionary:
    """The source vocabulary of a CTranslate2 model converted from fairseq, as a fairseq
    dictionary with the same ids (CTranslate2 names ``<pad>`` ``<blank>``)."""
    for name in ("source_vocabulary.json", "shared_vocabulary.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                symbols = json.load(f)
            break
    else:
        raise WDSetupError(f"--model {model_dir}: no source_vocabulary.json or shared_vocabulary.json. "
                           "Fix: pass a directory written by wd-export-ct2")
    dictionary = Dictionary(bos=symbols[0], pad=symbols[1], eos=symbols[2], unk=symbols[3])
    for symbol in symbols[4:]:
        dictionary.add_symbol(symbol)
    if len(dictionary) != len(symbols):
        raise WDSetupError(f"--model {model_dir}: its vocabulary repeats a symbol. "
                           "Fix: export the model again with wd-export-ct2")
    return dictionary


def build_engine(args):
    """(engine, source dictionary, source language, target language) of ``--model``."""
    search = dict(beam=args.beam, lenpen=args.lenpen, max_len_a=args.max_len_a, max_len_b=args.max_len_b)
    if os.path.isfile(os.path.join(args.model, "model.bin")):
        metadata_path = os.path.join(args.model, CT2_METADATA)
        metadata = {}
        if os.path.isfile(metadata_path):
            with open(metadata_path, encoding="utf-8") as f:
                metadata = json.load(f)
        if metadata.get("multilingual"):
            raise WDSetupError(f"--model {args.model}: a multilingual CTranslate2 model. "
                               "Fix: pass its fairseq checkpoint (wd-translate then puts the language tokens in)")
        src = args.source_lang or metadata.get("source_lang")
        tgt = args.target_lang or metadata.get("target_lang")
        if not (src and tgt):
            raise WDSetupError(f"--model {args.model}: its languages are not recorded ({CT2_METADATA}). "
                               "Fix: pass --source-lang and --target-lang")
        src_dict = ct2_vocabulary(args.model)
        max_positions = tuple(metadata.get("max_positions", (1024, 1024)))
        device = "cuda" if args.device == "cuda" else "cpu"
        engine = CTranslate2Engine(args.model, "default", device, args.threads or cpu_threads(),
                                   **search, src_dict=src_dict, tokens=NO_LANG_TOKENS,
                                   max_positions=max_positions, past_limit=False)
        return engine, src_dict, src, tgt
    state = read_checkpoint(args.model, "--model")
    run_task = state["cfg"]["task"] if state.get("cfg") is not None else vars(state.get("args"))
    data = args.data or run_task.get("data")
    src = args.source_lang or run_task.get("source_lang")
    tgt = args.target_lang or run_task.get("target_lang")
    if not (data and os.path.isdir(data)):
        raise WDSetupError(f"--model {args.model}: its data-bin {data} (the dictionaries) is not here. "
                           "Fix: pass --data DATA-BIN")
    if not (src and tgt):
        src, tgt = data_utils.infer_language_pair(data)  # as fairseq-train did
    if not (src and tgt):
        raise WDSetupError(f"--model {args.model}: no language pair recorded, and {data} has "
                           "no train.SRC-TGT files. Fix: pass --source-lang and --target-lang")
    task = data_task(state, data, src, tgt, "--model", args.model)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_teacher(args.model, task, flag="--model", state=state)
    del state
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.half()
    src, tgt = task_langs(task)
    engine = FairseqEngine(model, task, lang_tokens(task, src, tgt), device=device, **search)
    return engine, task.source_dictionary, src, tgt


def translate(lines: List[str], engine, src_dict: Dictionary, codec: TextCodec,
              max_tokens: Optional[int], batch_size: Optional[int]) -> List[str]:
    """The translations of ``lines``, in order (an empty line gives an empty line)."""
    encoded = [torch.LongTensor([src_dict.index(t) for t in codec.encode(line)] + [src_dict.eos()])
               for line in lines]
    sizes = np.array([len(tokens) for tokens in encoded])
    longest = engine.max_positions()[0]
    for number, size in enumerate(sizes, start=1):
        if size > longest:
            raise WDSetupError(f"input line {number} has {size - 1} subword tokens; the model accepts "
                               f"{longest - 1}. Fix: split that line")
    decodable = np.flatnonzero(sizes > 1)
    out = [""] * len(lines)
    source = ListDataset(encoded, sizes)
    for hypotheses in engine.translate(source, batch_plan(sizes, decodable, max_tokens, batch_size)):
        for index, tokens, _ in hypotheses:
            out[index] = codec.decode(tokens)
    return out


def cli_main(argv=None):
    parser = argparse.ArgumentParser(prog="wd-translate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="stock fairseq translation checkpoint, or a wd-export-ct2 directory")
    parser.add_argument("--data", help="data-bin with the dictionaries (fairseq checkpoints; "
                        "default: the checkpoint's own)")
    parser.add_argument("-s", "--source-lang", help="default: the model's")
    parser.add_argument("-t", "--target-lang", help="default: the model's")
    parser.add_argument("--input", default="-", help="raw text, one sentence a line (default: stdin)")
    parser.add_argument("--output", default="-", help="default: stdout; a file is written atomically")
    parser.add_argument("--tokenizer", choices=("moses", "none"), default="moses",
                        help="moses: as the recipes (default); none: the text is already tokenized")
    subwords = parser.add_mutually_exclusive_group()
    subwords.add_argument("--bpe-codes", help="subword-nmt BPE codes the model's data was made with")
    subwords.add_argument("--sentencepiece", help="SentencePiece model the model's data was made with")
    parser.add_argument("--bpe-vocabulary", help="apply-bpe --vocabulary file (the recipes': bpe/vocab.SRC)")
    parser.add_argument("--bpe-vocabulary-threshold", type=positive_int, default=50,
                        help="apply-bpe --vocabulary-threshold (default: 50, the recipes')")
    parser.add_argument("--beam", type=positive_int, default=6, help="default: 6, the authors'")
    parser.add_argument("--lenpen", type=finite_float, default=1.0)
    parser.add_argument("--max-len-a", type=nonnegative_float, default=0.0)
    parser.add_argument("--max-len-b", type=positive_int, default=200)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="sentences per batch")
    parser.add_argument("--max-tokens", type=positive_int, help="source tokens per batch")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: every core)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=logging.INFO, stream=sys.stderr)
    text = run_cli("wd-translate", lambda: "".join(line + "\n" for line in translate_input(args)))
    if args.output == "-":
        sys.stdout.write(text)
    else:
        write_atomic(args.output, text)


def translate_input(args) -> List[str]:
    """The translations of ``args.input``'s lines (refusals before any decoding)."""
    if args.bpe_vocabulary and not args.bpe_codes:
        raise WDSetupError("--bpe-vocabulary needs --bpe-codes")
    for flag, path in (("--input", args.input), ("--bpe-codes", args.bpe_codes),
                       ("--bpe-vocabulary", args.bpe_vocabulary), ("--sentencepiece", args.sentencepiece)):
        if path and path != "-" and not os.path.isfile(path):
            raise WDSetupError(f"{flag} {path}: no such file. Fix: pass an existing file")
    engine, src_dict, src, tgt = build_engine(args)
    codec = TextCodec(src, tgt, args.tokenizer, args.bpe_codes, args.bpe_vocabulary,
                      args.bpe_vocabulary_threshold, args.sentencepiece)
    lines = sys.stdin.read().split("\n") if args.input == "-" else read_lines(args.input)
    if args.input == "-" and lines and lines[-1] == "":
        lines.pop()
    logger.info("translating %d lines %s-%s with %s", len(lines), src, tgt, engine.name)
    return translate(lines, engine, src_dict, codec, args.max_tokens, args.batch_size)


if __name__ == "__main__":
    cli_main()
