"""Phase 1 under fairseq's distributed data parallel training: two CPU processes (torchrun,
gloo, torch DistributedDataParallel as on GPUs) stay in sync and end with the generator
parameters of one process with twice the update frequency; with and without word-level KD.

Two fairseq 0.12 limitations are specific to CPU (on GPUs neither applies):

* under torchrun it infers ``cfg.device_id = rank % torch.cuda.device_count()``
  (ZeroDivisionError without GPUs), so the workers get ``--distributed-init-method env://
  --distributed-no-spawn --distributed-rank $RANK`` explicitly;
* its ``pytorch_ddp`` wrapper always passes ``device_ids=[device_id]``, which torch refuses
  for a CPU module, so the worker below drops them (nothing else changes: same torch DDP,
  same ``find_unused_parameters=False``, no ``--ddp-backend no_c10d``).

Resuming: fairseq 0.12 sends rank 0's loaded checkpoint to the other ranks through
torch.save/torch.load of a buffer, which torch >= 2.6's weights_only default refuses (the
OmegaConf config inside). The plugin trusts that in-memory broadcast
(``safe_loading.trust_rank0_broadcasts``), so resuming needs no extra flag; the test checks it.
"""

import os
import re

import pytest
import torch
from conftest import BIN, TRAIN_FLAGS, USER_DIR, run_cli

import wd_fairseq  # noqa: F401  (allow-lists fairseq checkpoints for weights_only loading)

WORKER = '''"""fairseq-train as one CPU torchrun worker (see tests/test_distributed.py)."""
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

import fairseq.models.distributed_fairseq_model as wrapper
from fairseq import checkpoint_utils
from fairseq_cli.train import cli_main


def cpu_ddp(module, device_ids=None, output_device=None, **kwargs):
    """torch DDP as fairseq builds it, minus the device ids torch refuses on CPU."""
    print("worker: torch DistributedDataParallel", file=sys.stderr)
    return DistributedDataParallel(module, **kwargs)


save = checkpoint_utils.save_checkpoint


def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
    """fairseq's save (rank 0 writes), then every rank writes its trainable parameters."""
    result = save(cfg, trainer, epoch_itr, val_loss)
    params = {}
    for name, p in trainer.model.named_parameters():
        while name.startswith("module."):
            name = name[len("module."):]
        if p.requires_grad:
            params[name] = p.detach().clone()
    torch.save(params, os.path.join(cfg.save_dir, f"rank{trainer.data_parallel_rank}.pt"))
    return result


wrapper.DistributedDataParallel = cpu_ddp
checkpoint_utils.save_checkpoint = save_checkpoint
sys.argv = ["fairseq-train", *sys.argv[1:], "--distributed-rank", os.environ["RANK"]]
cli_main()
'''

STUDENT_FLAGS = [
    "--encoder-layers", "2", "--decoder-layers", "1", "--decoder-embed-dim", "16",
    "--decoder-ffn-embed-dim", "24", "--decoder-attention-heads", "2",
]
#: No dropout: the runs then differ only by the order of float reductions.
FLAGS = [
    *STUDENT_FLAGS, *TRAIN_FLAGS, "--max-tokens", "500", "--dropout", "0",
    "--attention-dropout", "0", "--activation-dropout", "0", "--disable-validation",
    "--log-interval", "1",
]
CRITERIA = {
    "label_smoothed": ["--criterion", "label_smoothed_cross_entropy"],
    "word_kd": ["--criterion", "kd_label_smoothed_cross_entropy", "--kd-alpha", "0.5",
                "--kd-temperature", "2"],
}
DISTRIBUTED = [
    "--cpu", "--distributed-world-size", "2", "--distributed-backend", "gloo",
    "--distributed-init-method", "env://", "--distributed-no-spawn",
]
UPDATES = 4
#: torchrun gives each worker one thread; the single process gets the same.
ENV = {"OMP_NUM_THREADS": "1"}


def generator_params(checkpoint):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    return {k: v for k, v in state.items() if ".generator." in k}


def max_abs_diff(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def torchrun(worker, *args):
    proc = run_cli("torchrun", "--standalone", "--nproc_per_node", "2", worker, *args, env=ENV)
    log = proc.stdout + proc.stderr
    assert log.count("worker: torch DistributedDataParallel") == 2  # c10d DDP on both ranks
    return log


@pytest.mark.parametrize("criterion", CRITERIA)
def test_two_processes_match_one_with_twice_the_update_freq(
        criterion, data_bin, postnorm_teacher, tmp_path):
    """Same seed and --max-tokens per process, no dropout; fairseq also checks at every
    update that the workers' gradient norms agree."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = [data_bin, "--user-dir", USER_DIR, "--arch", "wd_transformer",
            "--teacher-path", postnorm_teacher, *FLAGS, *CRITERIA[criterion]]
    ddp = tmp_path / "ddp"
    if criterion == "label_smoothed":
        # Stopped halfway and resumed, as a long multi-GPU run would be.
        torchrun(worker, *args, *DISTRIBUTED, "--max-update", UPDATES // 2, "--save-dir", ddp)
        # No --load-checkpoint-on-all-dp-ranks: rank 0's broadcast is trusted by the plugin.
        log = torchrun(worker, *args, *DISTRIBUTED, "--max-update", UPDATES, "--save-dir", ddp)
        assert re.search(rf"Loaded checkpoint \S+ \(epoch 1 @ {UPDATES // 2} updates\)", log)
    else:
        log = torchrun(worker, *args, *DISTRIBUTED, "--max-update", UPDATES, "--save-dir", ddp)
        assert "kd_loss" in log
    assert re.search(rf"num_updates[= ]{UPDATES}\b", log)
    ranks = [torch.load(ddp / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert max_abs_diff(*ranks) == 0.0  # in sync

    run_cli("fairseq-train", *args, "--cpu", "--update-freq", "2", "--max-update", UPDATES,
            "--save-dir", tmp_path / "single", env=ENV)
    single = generator_params(tmp_path / "single" / "checkpoint_last.pt")
    distributed = generator_params(ddp / "checkpoint_last.pt")
    assert max_abs_diff(distributed, {k: ranks[0][k] for k in distributed}) == 0.0
    diff = max_abs_diff(distributed, single)
    print(f"{criterion}: max |generator param diff|, 2 processes vs 1 x update-freq 2: {diff:.3g}")
    assert diff <= 1e-5
