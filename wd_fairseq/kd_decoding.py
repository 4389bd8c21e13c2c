"""The decoding half of ``wd-kd-data``: a fixed batch plan and the two engines that run it.

Both engines decode the same sentences with the same search:

* beam ``B``, length penalty ``lp``: a finished hypothesis of ``n`` tokens plus EOS
  scores ``sum(log p) / (n + 1) ** lp`` (fairseq divides by ``step + 1``; CTranslate2
  divides by the hypothesis length, which counts EOS), and
  the search ends once ``B`` hypotheses have finished (CTranslate2's ``patience=1``;
  with ``lp = 0`` it stops when the top beam ends, which picks the same hypothesis);
* the length limit of a source of ``s`` tokens (EOS included, as in the data-bin) is
  ``L = min(int(a * s + b), max_target_positions - 1)``. fairseq computes it from the
  padded batch width; the plan batches only sources of one length, so every engine
  applies it per sentence. fairseq forces EOS after ``L`` tokens; CTranslate2 gets
  ``max_decoding_length = L + 1`` and cuts there. A hypothesis of ``L`` or more
  tokens counts as overlong in both and falls back to the reference, so the two only
  differ in which overlong candidate wins (fairseq scores its forced EOS, CTranslate2
  scores the cut hypothesis without one);
* ``<unk>`` allowed and unpenalised in both. fairseq sets the log-probabilities of
  ``<pad>`` (and, at the first step, of EOS) to -inf after its log-softmax;
  CTranslate2 can only forbid tokens before its log-softmax, which renormalises the
  others. So ``<pad>`` (CTranslate2's ``<blank>``) is left allowed, as fairseq's
  scores of every other token are then identical (a hypothesis containing it falls
  back to the reference; its probability is tiny, as fairseq never trains on it as a
  target), while EOS is forbidden at the first step in both (fairseq ``min_len=1``,
  CTranslate2 ``min_decoding_length=1``): CTranslate2 then adds ``-log(1 - p(EOS))``
  of that step to every hypothesis of the sentence. After length normalisation that
  constant favours shorter hypotheses slightly, and is the reason (with floating-point
  near-ties) the two engines' top hypotheses differ with beam > 1: on the toy corpus
  of the tests about 1% of sentences, each engine's choice being the better one under
  its own scores;
* when more hypotheses finish in one step than the beam still needs, fairseq keeps the
  first ones in raw-score order and CTranslate2 keeps the best normalised one.

A multilingual teacher's sentences carry language tokens (``multilingual.LangTokens``):
both engines put the source token first in every source and force the target token as
the first output token (fairseq: the task's prefix; CTranslate2: ``target_prefix``),
and strip it from the hypothesis. Its log-probability is part of the score in both.

A hypothesis is flagged (:func:`classify`): empty, overlong, containing ``<pad>``, or
caught by an optional filter (:class:`Filters`), it falls back to the reference.

The plan is a function of the source lengths and batch settings only, never of what
is already done, so a resumed run decodes each remaining sentence in the same batch as
an uninterrupted run would: the results are identical, not just close.
"""

import logging
import os
import time
from collections import deque
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from fairseq import utils
from fairseq.data import LanguagePairDataset, PrependTokenDataset
from fairseq.dataclass.configs import GenerationConfig

from .multilingual import LangTokens

logger = logging.getLogger("wd_fairseq.kd_decoding")

#: A progress line at most this often (and once at the end).
PROGRESS_SECONDS = 30
#: CTranslate2's name of fairseq's <pad>.
PAD_TOKEN = "<blank>"
#: (corpus index, hypothesis tokens without EOS, score: length-normalised log-probability)
Hypothesis = Tuple[int, List[str], float]

#: The flag of a hypothesis: OK is kept, every other falls back to the reference.
OK, EMPTY, OVERLONG, SOURCE_TOO_LONG = "ok", "empty", "overlong", "source-too-long"
PAD = "pad-token"  # CTranslate2 put <pad> in the hypothesis (fairseq never does)
LENGTH_RATIO, LOW_SCORE = "length-ratio", "low-score"  # the optional filters
FLAGS = (OK, EMPTY, OVERLONG, SOURCE_TOO_LONG, PAD, LENGTH_RATIO, LOW_SCORE)
#: Rules of thumb of a teacher worth distilling: at most this share of its hypotheses run
#: into the length limit (degenerate repetition) or come out empty, and its kept
#: hypotheses are about as long as the references.
SANE_RUNAWAY_RATE, SANE_LENGTH_RATIO = 0.02, (0.8, 1.25)


def teacher_sanity(counts: dict, hypothesis_tokens: int, reference_tokens: int):
    """({runaway_rate, fallback_rate, length_ratio}, warnings) of a KD run: ``counts`` per
    flag; the tokens of the kept hypotheses and of their references."""
    total = max(sum(counts.values()), 1)
    report = {"runaway_rate": round((counts[OVERLONG] + counts[EMPTY]) / total, 4),
              "fallback_rate": round((total - counts[OK]) / total, 4),
              "length_ratio": round(hypothesis_tokens / reference_tokens, 3) if reference_tokens else None}
    warnings = []
    if report["runaway_rate"] > SANE_RUNAWAY_RATE:
        warnings.append(f"{report['runaway_rate']:.1%} of the teacher's hypotheses ran into the length "
                        f"limit or came out empty (over {SANE_RUNAWAY_RATE:.0%}): a teacher that "
                        "degenerates this often is weak, and its students learn from its other "
                        "outputs too. Check its BLEU (wd-evaluate) before distilling")
    low, high = SANE_LENGTH_RATIO
    if report["length_ratio"] is not None and not low <= report["length_ratio"] <= high:
        warnings.append(f"the teacher's kept hypotheses are {report['length_ratio']:.2f}x as long as "
                        f"the references (outside {low}-{high}): check --lenpen and the teacher's BLEU")
    return report, warnings


def length_limit(size: int, max_len_a: float, max_len_b: int, max_target: int) -> int:
    """fairseq's ``max_len`` for a source of ``size`` tokens (EOS included)."""
    return min(int(max_len_a * size + max_len_b), max_target - 1)


def hypothesis_limit(size: int, tokens: LangTokens, max_len_a: float, max_len_b: int,
                     max_target: int) -> int:
    """The length at which a hypothesis (its target language token stripped) of a
    source of ``size`` tokens was cut: :func:`length_limit` of the source as the teacher
    sees it (language token included), less the forced target language token."""
    return (length_limit(size + (tokens.source is not None), max_len_a, max_len_b, max_target)
            - (tokens.target is not None))


class Filters(NamedTuple):
    """Optional outlier filters (None: off). A KD pair falls back to the reference when
    hypothesis and source lengths differ by more than a factor ``max_length_ratio``, or
    when the teacher's length-normalised log-probability is below ``min_score``."""

    max_length_ratio: Optional[float] = None
    min_score: Optional[float] = None


def classify(tokens: List[str], limit: int, source_length: int = 0, score: float = 0.0,
             filters: Filters = Filters()) -> str:
    """Flag of a hypothesis ``tokens`` (EOS not counted) decoded with length limit
    ``limit`` from ``source_length`` tokens (EOS not counted), scored ``score``."""
    length = len(tokens)
    if PAD_TOKEN in tokens:
        return PAD
    if length == 0:
        return EMPTY
    if length >= limit:  # fairseq forces EOS there, CTranslate2 cuts: it did not end
        return OVERLONG
    if filters.max_length_ratio is not None and source_length and \
            max(length / source_length, source_length / length) > filters.max_length_ratio:
        return LENGTH_RATIO
    if filters.min_score is not None and score < filters.min_score:
        return LOW_SCORE
    return OK


def batch_plan(sizes: np.ndarray, decodable: np.ndarray, max_tokens: Optional[int],
               batch_size: Optional[int]) -> List[np.ndarray]:
    """Batches of corpus indices: ``decodable`` sorted by (source length, index), one
    length per batch, each at most ``batch_size`` sentences and ``max_tokens`` source
    tokens (a single longer sentence gets a batch of its own)."""
    order = decodable[np.lexsort((decodable, sizes[decodable]))]
    batches = []
    for run in np.split(order, np.flatnonzero(np.diff(sizes[order])) + 1):
        if not len(run):
            continue
        per_batch = len(run)
        if max_tokens:
            per_batch = min(per_batch, max(1, max_tokens // int(sizes[run[0]])))
        if batch_size:
            per_batch = min(per_batch, batch_size)
        batches += [run[i:i + per_batch] for i in range(0, len(run), per_batch)]
    return batches


def eta_seconds(tokens_done: int, tokens_total: int, elapsed: float) -> float:
    """Seconds left at the observed rate of source tokens (EOS included): the plan
    decodes the shortest sources first, so a rate of sentences would promise too much."""
    if tokens_done >= tokens_total:
        return 0.0
    return (tokens_total - tokens_done) * elapsed / tokens_done if tokens_done else float("inf")


class Progress:
    """Logs sentences done, sentences/s and an ETA by source tokens at most every
    PROGRESS_SECONDS (and once at the end). ``tokens``: the source tokens of all
    ``total`` sentences."""

    def __init__(self, total: int, tokens: int, label: str = ""):
        self.total, self.tokens, self.label = total, tokens, label
        self.done = self.tokens_done = 0
        self.start = self.reported = time.time()

    def update(self, count: int, tokens: int) -> None:
        self.done += count
        self.tokens_done += tokens
        now = time.time()
        if now - self.reported < PROGRESS_SECONDS and self.done < self.total:
            return
        self.reported = now
        elapsed = max(now - self.start, 1e-9)
        logger.info("%sdecoded %d/%d sentences, %d%% of the source tokens (%.1f sentences/s, "
                    "%.0f tokens/s, ETA %s)", self.label, self.done, self.total,
                    100 * self.tokens_done // max(self.tokens, 1), self.done / elapsed,
                    self.tokens_done / elapsed,
                    _clock(eta_seconds(self.tokens_done, self.tokens, elapsed)))


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class FairseqEngine:
    """fairseq's ``SequenceGenerator`` on one device."""

    name = "fairseq"

    def __init__(self, teacher, task, tokens: LangTokens, beam: int, lenpen: float,
                 max_len_a: float, max_len_b: int, device: torch.device):
        self.teacher, self.task, self.tokens, self.device = teacher, task, tokens, device
        self.max_len_a, self.max_len_b = max_len_a, max_len_b
        self.generator = task.build_generator(
            [teacher], GenerationConfig(beam=beam, lenpen=lenpen, nbest=1, max_len_a=max_len_a,
                                        max_len_b=max_len_b))

    def max_positions(self) -> Tuple[int, int]:
        """(longest source, ``max_target`` of :func:`length_limit`)."""
        return (min(self.teacher.max_positions()[0], self.task.max_positions()[0]),
                self.generator.max_len)

    def translate(self, source, batches: Sequence[np.ndarray]) -> Iterator[List[Hypothesis]]:
        """Hypotheses of each batch of ``source`` (a fairseq dataset), batch by batch."""
        src_dict, tgt_dict = self.task.source_dictionary, self.task.target_dictionary
        if self.tokens.source is not None:
            source = PrependTokenDataset(source, src_dict.index(self.tokens.source))
        dataset = LanguagePairDataset(source, source.sizes, src_dict, shuffle=False)
        for batch in batches:
            sample = dataset.collater([dataset[int(i)] for i in batch])
            if self.device.type == "cuda":
                sample = utils.move_to_cuda(sample, device=self.device)
            # (the multilingual task forces the target language token as a prefix)
            hypos = self.task.inference_step(self.generator, [self.teacher], sample)
            yield [(index, strip_prefix([tgt_dict[t] for t in nbest[0]["tokens"][:-1].tolist()],
                                        self.tokens.target), float(nbest[0]["score"]))
                   for index, nbest in zip(sample["id"].tolist(), hypos)]


class CTranslate2Engine:
    """A CTranslate2 ``Translator`` on the CPU or on every visible GPU.

    On the CPU, ``threads`` translators of one thread each work on different batches
    (``inter_threads``): at KD-data batch sizes that is faster than one translator using
    every thread inside each operation (measured 1.5x with 2 threads, beam 6,
    ``benchmarks/kd_data_speed.py``). A batch's result does not depend on the split.

    ``past_limit``: decode one token past the length limit, so that a hypothesis cut
    there is recognisably overlong (KD data); without it, a hypothesis is cut at the
    limit, where fairseq forces EOS: the same tokens (translation)."""

    name = "ctranslate2"

    def __init__(self, model_dir: str, quantization: str, device: str, threads: int, beam: int,
                 lenpen: float, max_len_a: float, max_len_b: int, src_dict, tokens: LangTokens,
                 max_positions: Tuple[int, int], past_limit: bool = True):
        import ctranslate2

        self.devices = (list(range(ctranslate2.get_cuda_device_count())) if device == "cuda"
                        else [0])
        self.translator = ctranslate2.Translator(
            model_dir, device=device, device_index=self.devices, compute_type=quantization,
            inter_threads=threads if device == "cpu" else 1, intra_threads=1 if device == "cpu" else 0)
        self.compute_type = self.translator.compute_type
        self.device, self.threads = device, threads if device == "cpu" else None
        self.beam, self.lenpen = beam, lenpen
        self.max_len_a, self.max_len_b = max_len_a, max_len_b
        self.src_dict, self.tokens = src_dict, tokens
        self._max_positions, self.past_limit = max_positions, past_limit

    def max_positions(self) -> Tuple[int, int]:
        return self._max_positions

    def translate(self, source, batches: Sequence[np.ndarray]) -> Iterator[List[Hypothesis]]:
        """As :meth:`FairseqEngine.translate`; up to two batches per translator in flight."""
        pending = deque()
        window = 2 * len(self.devices) * (self.threads or 1)
        for batch in batches:
            pending.append((batch, self._submit(source, batch)))
            if len(pending) >= window:
                yield self._collect(*pending.popleft())
        while pending:
            yield self._collect(*pending.popleft())

    def _submit(self, source, batch: np.ndarray):
        first = [self.tokens.source] if self.tokens.source is not None else []
        tokens = [first + [self.src_dict[t] for t in source[int(i)][:-1].tolist()] for i in batch]
        limit = hypothesis_limit(int(source.sizes[batch[0]]), self.tokens, self.max_len_a,
                                 self.max_len_b, self._max_positions[1])
        prefix = [[self.tokens.target]] * len(batch) if self.tokens.target is not None else None
        # CTranslate2's lengths count the prefix: with one, min_decoding_length=1 allows EOS
        # right after it, as fairseq (whose min_len=1 only bans EOS at the forced step)
        return self.translator.translate_batch(
            tokens, target_prefix=prefix, asynchronous=True, beam_size=self.beam, patience=1,
            length_penalty=self.lenpen,
            max_decoding_length=limit + self.past_limit + (prefix is not None),
            min_decoding_length=1, return_end_token=True, max_input_length=0, return_scores=True)

    def _collect(self, batch: np.ndarray, results) -> List[Hypothesis]:
        hypotheses = []
        for index, result in zip(batch.tolist(), results):
            result = result.result()
            tokens = result.hypotheses[0]  # ends with EOS unless cut at the limit
            tokens = tokens[:-1] if tokens[-1:] == ["</s>"] else tokens
            hypotheses.append((index, strip_prefix(tokens, self.tokens.target), result.scores[0]))
        return hypotheses


def strip_prefix(tokens: List[str], prefix: Optional[str]) -> List[str]:
    """A hypothesis without the forced target language token it starts with."""
    return tokens[1:] if prefix is not None and tokens[:1] == [prefix] else tokens


def cpu_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
