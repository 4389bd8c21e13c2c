"""Readable logs: silence the library noise every fairseq 0.12 process prints.

Exactly these, each matched by its logger or warning category and the start of its
message, so every other warning and error still shows:

* ``Please install tensorboardX``: logged (INFO) by fairseq's text-to-speech task when
  ``fairseq.tasks`` is imported, in every fairseq command and console script, even
  ``--help``; tensorboard logging is an option nobody here asked for.
* hydra's deprecation ``UserWarning``\\ s about how fairseq 0.12 composes its config
  (five per process, every training and decoding process).
* hydra's DEBUG lines (``Setting JobRuntime``) that fairseq-generate lets through.
* torch's warnings about the torch API fairseq 0.12 calls, once per training process:
  ``torch.cuda.amp.autocast(args...)`` deprecated (FutureWarning), mismatched
  key_padding_mask/attn_mask types deprecated, and, on CPU, ``pin_memory`` without an
  accelerator (the plan and fairseq's own log already say which devices train).

Standard library only: the installed ``wd_fairseq.pth`` runs :func:`install` when an
interpreter of the environment starts (fairseq's own commands and the processes they
spawn included), without importing fairseq or this package.
"""

import logging
import warnings

#: Starts of hydra's deprecation warnings that fairseq 0.12 triggers (regular expressions).
HYDRA_DEPRECATIONS = (
    r"hydra\.experimental\.(initialize|compose)\(\) is no longer experimental",
    r"\s*The version_base parameter is not specified",
    r"In 'config': Usage of deprecated keyword in package header '# @package _group_'",
    r"\s*'config' is validated against ConfigStore schema with the same name",
    r"\s*The strict flag in the compose API is deprecated",
)

#: (category, start of message) of torch's warnings about fairseq 0.12's calls.
TORCH_WARNINGS = (
    (FutureWarning, r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated"),
    (UserWarning, r"Support for mismatched key_padding_mask and attn_mask is deprecated"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
)


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    logging.getLogger("fairseq.tasks.text_to_speech").addFilter(
        _DropMessage("Please install tensorboardX"))
    for pattern in HYDRA_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    for category, pattern in TORCH_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    logging.getLogger("hydra").setLevel(logging.INFO)
