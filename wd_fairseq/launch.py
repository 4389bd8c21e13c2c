"""``wd-train``: ``fairseq-train`` as one process of a ``torchrun`` launch, on GPUs or CPUs.

The recipes train on N > 1 devices with ``torchrun --standalone --nproc_per_node N
wd-train ARGS`` (one process per device, the launch torch documents), and on one device
with plain ``fairseq-train``. Under torchrun this adds what fairseq 0.12 would otherwise
infer wrongly or not at all:

* ``--distributed-init-method env:// --distributed-no-spawn --distributed-rank RANK
  --device-id LOCAL_RANK`` (fairseq's own inference takes ``RANK % cuda.device_count()``
  as the device, which divides by zero without GPUs, and would spawn again);
* on CPU (``--cpu``), torch's DistributedDataParallel without ``device_ids`` (fairseq
  always passes them; torch refuses them for a CPU module), over the gloo backend;
* resuming: the plugin's trust of rank 0's in-memory checkpoint broadcast
  (:func:`wd_fairseq.safe_loading.trust_rank0_broadcasts`), which stock fairseq-train
  does not load, so the other ranks can read the checkpoint rank 0 sends them.

Everything else is fairseq-train's, unchanged: the same flags, checks and checkpoints.
"""

import os
import sys
from typing import List


def torchrun_flags(argv: List[str], env=os.environ) -> List[str]:
    """The flags a torchrun worker adds (none outside torchrun or with one process)."""
    if int(env.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in env:
        return []
    flags = ["--distributed-init-method", "env://", "--distributed-no-spawn",
             "--distributed-rank", env["RANK"], "--device-id", env.get("LOCAL_RANK", "0")]
    if "--cpu" in argv and "--distributed-backend" not in argv:
        flags += ["--distributed-backend", "gloo"]
    return flags


def _ddp_without_cpu_device_ids():
    """fairseq's DDP wrapper, minus the device ids torch refuses for a CPU module."""
    import fairseq.models.distributed_fairseq_model as wrapper
    from torch.nn.parallel import DistributedDataParallel

    def cpu_ddp(module, device_ids=None, output_device=None, **kwargs):
        return DistributedDataParallel(module, **kwargs)

    wrapper.DistributedDataParallel = cpu_ddp


def cli_main():
    argv = sys.argv[1:]
    extra = torchrun_flags(argv)
    if extra:
        import wd_fairseq  # noqa: F401  (trusts rank 0's checkpoint broadcast)

        if "--cpu" in argv:
            _ddp_without_cpu_device_ids()
    from fairseq_cli.train import cli_main as fairseq_train

    sys.argv = ["fairseq-train", *argv, *extra]
    fairseq_train()


if __name__ == "__main__":
    cli_main()
