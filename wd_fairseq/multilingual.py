"""fairseq's multilingual translation task (``translation_multi_simple_epoch``, the task of
M2M-100 and NLLB): a run's language list, and its task set up for one direction, for
the tools that work one direction at a time (``wd-kd-data``, ``wd-export-ct2``).

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
from fairseq.data.multilingual.multilingual_data_manager import MultilingualDatasetManager
from omegaconf import DictConfig, OmegaConf

from .errors import WDSetupError

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


def local_file(path: str, data: str) -> Optional[str]:
    """A file a run names (``--fixed-dictionary``, ``--lang-dict``): at its path, else the
    file of that name in ``data``; None where neither exists."""
    if os.path.isfile(path):
        return path
    local = os.path.join(data, os.path.basename(path))
    return local if os.path.isfile(local) else None


def run_langs(settings: dict, data: str) -> Optional[List[str]]:
    """A multilingual run's languages in the order of its language tokens (the order
    decides their ids), as fairseq's task derives them: ``--lang-dict``, ``--langs``, else
    the sorted languages of ``--lang-pairs``. None where its ``--lang-dict`` is found
    neither at its path nor in ``data``."""
    lang_dict = settings.get("lang_dict")
    if lang_dict:
        lang_dict = local_file(lang_dict, data)
        if lang_dict is None:
            return None
    langs = settings.get("langs")
    args = argparse.Namespace(lang_dict=lang_dict, langs=langs.split(",") if isinstance(langs, str) else langs,
                              lang_pairs=["-".join(pair) for pair in lang_pairs(settings)])
    return list(MultilingualDatasetManager.load_langs(args))


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
        if path:
            settings[key] = local_file(path, data)
            if settings[key] is None:
                raise WDSetupError(
                    f"{what}: its run's {flag} {path} does not exist here, nor does "
                    f"{os.path.join(data, os.path.basename(path))}. Fix: copy that file into {data}")
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
