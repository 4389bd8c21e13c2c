"""argparse types shared by the console scripts: a bad number or format is refused by
the parser, before any file is read or model loaded, in a message naming the flag
(``wd-kd-data: error: argument --beam: must be an integer >= 1, got '0'``)."""

import argparse
import math
import re
from typing import Callable


def _number(convert: Callable, accept: Callable, rule: str) -> Callable:
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    parse.__name__ = rule
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
nonnegative_float = _number(float, lambda v: v >= 0, "a number >= 0")
finite_float = _number(float, lambda v: True, "a finite number")
at_least_one = _number(float, lambda v: v >= 1, "a number >= 1")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
probability = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")

_PAIRS = re.compile(r"[^\s,-]+-[^\s,-]+(,[^\s,-]+-[^\s,-]+)*")


def pair_list(text: str) -> str:
    """``SRC-TGT[,SRC-TGT...]``, e.g. ``es-en,en-es``."""
    if not _PAIRS.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be SRC-TGT pairs separated by commas "
                                         f"(e.g. es-en,en-es), got {text!r}")
    return text
