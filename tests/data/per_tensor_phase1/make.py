"""How this folder was made: wd_fairseq at commit 92e2a64 (one generator per student
tensor, before generator banks), on conftest's toy data-bin.

    git worktree add --detach /tmp/oldcode 92e2a64
    python tests/data/per_tensor_phase1/make.py /tmp/oldcode /tmp/oldfx

checkpoint_last.pt: phase 1 after 4 updates (Adam state included); student.pt: its
wd-materialize output; grads.pt: the generators' gradients of ``conftest.probe_loss``
on that phase-1 model. All are read by tests/test_wd_model.py.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from conftest import (TRAIN_FLAGS, preprocess, probe_loss, run_cli,  # noqa: E402
                      train_teacher, write_toy_corpus)


def save_gradients(checkpoint: str, data: str, out: str) -> None:
    import torch
    from fairseq import checkpoint_utils

    import wd_fairseq  # noqa: F401  (registers the model)

    model = checkpoint_utils.load_model_ensemble([checkpoint], arg_overrides={"data": data})[0][0]
    probe_loss(model).backward()
    torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)


if __name__ == "__main__":
    if sys.argv[1] == "--gradients":
        save_gradients(*sys.argv[2:5])
        sys.exit()
    old_code, out = Path(sys.argv[1]), Path(sys.argv[2])
    write_toy_corpus(out / "raw", seed=1)
    data = preprocess(out / "raw", out / "data-bin")
    teacher = train_teacher(data, out / "teacher")
    env = {"PYTHONPATH": str(old_code)}
    run_cli("fairseq-train", data, "--user-dir", old_code / "wd_fairseq", "--arch", "wd_transformer",
            "--teacher-path", teacher, "--encoder-layers", "2", "--decoder-layers", "1",
            "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "24",
            "--decoder-attention-heads", "2", *TRAIN_FLAGS, "--max-tokens", "250",
            "--max-update", "4", "--save-dir", out / "phase1", "--disable-validation", env=env)
    run_cli("wd-materialize", out / "phase1/checkpoint_last.pt", out / "student.pt", env=env)
    subprocess.run([sys.executable, __file__, "--gradients", str(out / "phase1/checkpoint_last.pt"),
                    str(data), str(out / "grads.pt")], env={"PYTHONPATH": str(old_code)}, check=True)
