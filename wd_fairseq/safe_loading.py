"""Safe loading of fairseq checkpoints on torch >= 2.6.

torch.load defaults to ``weights_only=True`` since torch 2.6, and fairseq 0.12
calls it without arguments. Stock fairseq checkpoints then fail to load because
their config holds an ``argparse.Namespace`` (and, in some runs, numpy scalars).
Instead of switching weights_only off, we allow-list exactly those types:
weights_only loading still refuses any other global, so a checkpoint cannot run
arbitrary code.

Importing the plugin (``--user-dir``) calls :func:`allow_fairseq_checkpoints`.
For stock commands run without the plugin (e.g. ``fairseq-generate`` on a phase-2
checkpoint), the installed package ships ``wd_fairseq.pth`` (written by setup.py, for
``pip install -e .`` too), which loads this file
alone at interpreter start-up and calls :func:`install_import_hook`: nothing is
imported until fairseq imports its ``checkpoint_utils``, then the allow-list is
registered. This file therefore imports only the standard library at top level.
"""

import importlib.abc
import importlib.util
import re
import sys
from typing import Optional

#: torch's weights_only refusals of a pickle that would import or call a global (what
#: a full load would run), each capturing that global.
REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)|unsupported GLOBAL ([\w.]+) whose module")


def fairseq_checkpoint_globals() -> list:
    """The only non-tensor, non-container types found in fairseq 0.12 checkpoints."""
    import argparse

    import numpy as np

    numpy_core = np._core if hasattr(np, "_core") else np.core
    return [
        argparse.Namespace,
        np.dtype,
        numpy_core.multiarray.scalar,
        type(np.dtype(np.float64)),
        type(np.dtype(np.float32)),
        type(np.dtype(np.int64)),
    ]


def allow_fairseq_checkpoints() -> None:
    """Allow-list fairseq's checkpoint types for ``torch.load(weights_only=True)``."""
    import torch

    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(fairseq_checkpoint_globals())


def refused_global(error: BaseException) -> Optional[str]:
    """The global a code-executing pickle names, from torch's weights_only refusal
    ``error`` (None: refused for another reason)."""
    match = REFUSED_GLOBAL.search(str(error))
    return match and (match.group(1) or match.group(2))


class _AllowAfterFairseqImport(importlib.abc.MetaPathFinder):
    """Lets ``fairseq.checkpoint_utils`` import as usual, then allow-lists."""

    target = "fairseq.checkpoint_utils"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                allow_fairseq_checkpoints()

            spec.loader.exec_module = exec_module
        return spec


def install_import_hook() -> None:
    """Register the allow-list as soon as fairseq's checkpoint code is imported."""
    if "fairseq.checkpoint_utils" in sys.modules:
        allow_fairseq_checkpoints()
    elif not any(isinstance(f, _AllowAfterFairseqImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AllowAfterFairseqImport())


def trust_rank0_broadcasts() -> None:
    """Let distributed runs resume under torch >= 2.6 without extra flags.

    fairseq 0.12 reads a checkpoint on rank 0 only and sends the loaded object to
    the other ranks by ``torch.save`` to memory and ``torch.load``; with
    weights_only the receivers refuse its config (a DictConfig). Those bytes are
    made in memory by rank 0 of the same job, from a file rank 0 read with safe
    loading, so the receivers unpickle them fully. Files are never loaded this way.
    """
    import io

    import torch
    from fairseq.distributed import utils as dist_utils

    if getattr(dist_utils._broadcast_object_slow, "trusts_rank0", False):
        return

    def broadcast_object_slow(obj, src_rank, group, dist_device):
        if dist_utils.get_rank(group) == src_rank:
            payload = io.BytesIO()
            torch.save(obj, payload)
            data = torch.ByteTensor(payload.getbuffer()).to(dist_device)
            dist_utils.broadcast(torch.LongTensor([len(data)]).to(dist_device), src=src_rank, group=group)
            dist_utils.broadcast(data, src=src_rank, group=group)
            return obj
        size = torch.LongTensor([0]).to(dist_device)
        dist_utils.broadcast(size, src=src_rank, group=group)
        data = torch.ByteTensor(int(size.item())).to(dist_device)
        dist_utils.broadcast(data, src=src_rank, group=group)
        return torch.load(io.BytesIO(data.cpu().numpy()), map_location="cpu", weights_only=False)

    broadcast_object_slow.trusts_rank0 = True
    dist_utils._broadcast_object_slow = broadcast_object_slow
