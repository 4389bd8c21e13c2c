"""fairseq's multilingual translation task (``translation_multi_simple_epoch``, the task of
M2M-100 and NLLB) for the tools that work one direction at a time (``wd-kd-data``,
``wd-export-ct2``).

A multilingual run has one dictionary for every language, extended by the task with a
language token per language (``__xx__``). With ``--encoder-langtok src`` (or ``tgt``)
every source sentence starts with the source (or target) language's token; with
``--decoder-langtok`` every target sentence starts with the target language's token,
which decoding forces as the first output token and removes from the result.
"""

import argparse
import os
from typing import List, NamedTuple, Optional, Tuple

from fairseq import tasks
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import DictConfig, OmegaConf

from .teacher import WDSetupError, check_dictionaries

MULTILINGUAL_TASK = "translation_multi_simple_epoch"
#: Entries fairseq's nllb branch appends after the language tokens with
#: --add-data-source-prefix-tags (NLLB-200 checkpoints); fairseq main's task does not know
#: the flag, so its dictionaries are these 3 entries short (fairseq#4557).
NLLB_DATA_SOURCE_TAGS = ("<MINED_DATA>", "<MMT_BT_DATA>", "<SMT_BT_DATA>")


class LangTokens(NamedTuple):
    """The language tokens of one direction (None: the run has none on that side)."""

    source: Optional[str]  # first token of every source sentence (--encoder-langtok)
    target: Optional[str]  # first target token: forced in decoding, stripped from output


NO_LANG_TOKENS = LangTokens(None, None)


def task_settings(task_cfg) -> dict:
    """A run's ``cfg.task`` (Namespace, DictConfig or dict) as a plain dict."""
    if isinstance(task_cfg, argparse.Namespace):
        return dict(vars(task_cfg))
    if isinstance(task_cfg, DictConfig):
        return OmegaConf.to_container(task_cfg, resolve=True, enum_to_str=True)
    return dict(task_cfg or {})


def is_multilingual(task_cfg) -> bool:
    settings = task_settings(task_cfg)
    return (settings.get("_name") or settings.get("task")) == MULTILINGUAL_TASK


def lang_pairs(settings: dict) -> List[Tuple[str, str]]:
    """The (source, target) directions of a multilingual run's ``--lang-pairs``."""
    listed = settings["lang_pairs"]
    return [tuple(p.split("-")) for p in (listed.split(",") if isinstance(listed, str) else listed)]


def direction_task(task_cfg, data: str, source_lang: str, target_lang: str, what: str):
    """The multilingual task of a run (``task_cfg``) set up for one direction, as
    ``fairseq-generate -s SRC -t TGT`` sets it up: the run's dictionary with its language
    tokens, data from ``data``. A ``--fixed-dictionary`` or ``--lang-dict`` path of the
    run that does not exist here is looked for in ``data``."""
    settings = task_settings(task_cfg)
    for key in ("add_ssl_task_tokens", "finetune_dict_specs"):
        if settings.get(key):
            raise WDSetupError(f"{what}: trained with --{key.replace('_', '-')} (fairseq's nllb "
                               "branch), which wd_fairseq does not support. Fix: use a checkpoint "
                               "trained without it")
    if settings.get("lang_tok_replacing_bos_eos"):
        raise WDSetupError(f"{what}: trained with --lang-tok-replacing-bos-eos, which wd_fairseq "
                           "does not support. Fix: use a run with language tokens as prefixes")
    for key, flag in (("fixed_dictionary", "--fixed-dictionary"), ("lang_dict", "--lang-dict")):
        path = settings.get(key)
        if path and not os.path.isfile(path):
            local = os.path.join(data, os.path.basename(path))
            if not os.path.isfile(local):
                raise WDSetupError(
                    f"{what}: its run's {flag} {path} does not exist here, nor does {local}. "
                    f"Fix: copy that file into {data}")
            settings[key] = local
    settings.update(_name=MULTILINGUAL_TASK, task=MULTILINGUAL_TASK, data=data,
                    source_lang=source_lang, target_lang=target_lang)
    try:
        task = tasks.setup_task(argparse.Namespace(**settings))
    except (FileNotFoundError, AssertionError) as e:
        raise WDSetupError(
            f"{what}: its multilingual task cannot be set up for {source_lang}-{target_lang} "
            f"on {data} ({e}). Fix: pass the data-bin binarised with the run's dictionary, "
            f"with the languages of its --langs / --lang-pairs") from e
    if settings.get("add_data_source_prefix_tags"):
        for dictionary in {id(d): d for d in task.dicts.values()}.values():
            for tag in NLLB_DATA_SOURCE_TAGS:
                dictionary.add_symbol(tag)
    return task


def data_task(state: dict, data: str, source_lang: str, target_lang: str, flag: str, path: str):
    """The task that reads direction ``source_lang``-``target_lang`` of ``data`` for the
    checkpoint ``state`` (fairseq's translation task, or its run's own multilingual task),
    once the data passes the one rule of :func:`~wd_fairseq.teacher.check_dictionaries`."""
    run = state["cfg"]["task"] if state.get("cfg") is not None else state.get("args")
    if is_multilingual(run):
        task = direction_task(run, data, source_lang, target_lang, f"{flag} {path}")
    else:
        task = TranslationTask.setup_task(
            TranslationConfig(data=data, source_lang=source_lang, target_lang=target_lang))
    check_dictionaries(state, task, path, flag)
    return task


def lang_tokens(task, source_lang: str, target_lang: str) -> LangTokens:
    """The language tokens of direction ``source_lang``-``target_lang`` in ``task`` (a
    multilingual task, or any other: then none)."""
    manager = getattr(task, "data_manager", None)
    if manager is None:
        return NO_LANG_TOKENS
    source_spec, target_spec = task.args.langtoks["main"]
    source = manager.get_encoder_langtok(source_lang, target_lang, source_spec)
    target = manager.get_decoder_langtok(target_lang, target_spec)
    dictionary = task.source_dictionary
    return LangTokens(None if source is None else dictionary[source],
                      None if target is None else task.target_dictionary[target])
