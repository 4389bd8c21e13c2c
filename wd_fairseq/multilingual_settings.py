"""The settings of a run of fairseq's multilingual task (``translation_multi_simple_epoch``):
whether a run is one, its directions, its language list and the files it names."""

import argparse
import os
from typing import List, Optional, Tuple

from fairseq.data.multilingual.multilingual_data_manager import MultilingualDatasetManager
from omegaconf import DictConfig, OmegaConf

MULTILINGUAL_TASK = "translation_multi_simple_epoch"


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
