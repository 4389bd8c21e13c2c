"""kd_label_smoothed_cross_entropy: α = 0 is label_smoothed_cross_entropy exactly; the KD
term is (1-α)·LS-CE + α·T²·KL(teacher_T || student_T) over non-padding tokens; the WD
model's own teacher is reused; a --teacher-path teacher never reaches checkpoints."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import TRAIN_FLAGS, USER_DIR, build_wd, run_cli

import wd_fairseq  # noqa: F401  (registers the criterion)
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.models.transformer import TransformerModel
from wd_fairseq.criterion import (
    KDLabelSmoothedCrossEntropyCriterion,
    KDLabelSmoothedCrossEntropyCriterionConfig,
)
from wd_fairseq.teacher import WDSetupError

STUDENT = dict(
    encoder_layers=2, decoder_layers=1, encoder_embed_dim=32, decoder_embed_dim=16,
    encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=32, encoder_attention_heads=4,
    decoder_attention_heads=4,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task(data_bin):
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    task = TranslationTask.setup_task(TranslationConfig(  # the values fairseq-train fills in
        data=str(data_bin), source_lang="src", target_lang="tgt", train_subset="train",
        dataset_impl="mmap", required_seq_len_multiple=1))
    task.load_dataset("valid")
    return task


def student(task, seed=1):
    """A plain stock transformer student (the KD baseline's kind of model)."""
    from fairseq.models.transformer import base_architecture

    torch.manual_seed(seed)
    args = argparse.Namespace(arch="transformer", **STUDENT)
    base_architecture(args)
    return TransformerModel.build_model(args, task)


def batch(task, n=12):
    dataset = task.dataset("valid")
    return dataset.collater([dataset[i] for i in range(n)])


def kd_criterion(task, **kw):
    cfg = OmegaConf.structured(
        KDLabelSmoothedCrossEntropyCriterionConfig(label_smoothing=0.1, sentence_avg=False, **kw)
    )
    return task.build_criterion(OmegaConf.merge(cfg, {"_name": "kd_label_smoothed_cross_entropy"}))


def run(criterion, model, sample, seed=7):
    """Loss, logging output and gradients of one forward/backward in train mode."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # same dropout masks for every criterion
    loss, sample_size, log = criterion(model, sample)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), sample_size, log, grads


def test_registered_through_fairseq_registry(task):
    assert isinstance(kd_criterion(task, kd_alpha=0.5), KDLabelSmoothedCrossEntropyCriterion)


def test_alpha_zero_equals_label_smoothed_cross_entropy_exactly(task):
    model, sample = student(task), batch(task)
    ls = LabelSmoothedCrossEntropyCriterion.build_criterion(
        OmegaConf.structured(LabelSmoothedCrossEntropyCriterionConfig(label_smoothing=0.1,
                                                                      sentence_avg=False)), task)
    expected = run(ls, model, sample)
    got = run(kd_criterion(task, kd_alpha=0.0), model, sample)
    assert torch.equal(got[0], expected[0])
    assert got[1] == expected[1]
    assert got[2].keys() == expected[2].keys()
    for key in expected[2]:
        assert torch.equal(torch.as_tensor(got[2][key]), torch.as_tensor(expected[2][key])), key
    assert got[3].keys() == expected[3].keys() and len(got[3]) > 0
    for name in expected[3]:
        assert torch.equal(got[3][name], expected[3][name]), name


def expected_kd_loss(model, teacher, sample, alpha, temperature, ls_loss):
    """The definition, token by token, written independently of the criterion."""
    model.train()
    torch.manual_seed(7)
    student_logits = model(**sample["net_input"])[0].float()
    teacher.eval()
    with torch.no_grad():
        teacher_logits = teacher(**sample["net_input"])[0].float()
    total = 0.0
    for b in range(sample["target"].size(0)):
        for t in range(sample["target"].size(1)):
            if sample["target"][b, t] == 1:  # padding
                continue
            p = F.softmax(teacher_logits[b, t] / temperature, -1)
            log_q = F.log_softmax(student_logits[b, t] / temperature, -1)
            total = total + (p * (p.log() - log_q)).sum()
    return (1 - alpha) * ls_loss + alpha * temperature ** 2 * total, total


def test_kd_loss_with_teacher_path(task, postnorm_teacher):
    model, sample = student(task), batch(task)
    criterion = kd_criterion(task, kd_alpha=0.3, kd_temperature=2.0,
                             teacher_path=str(postnorm_teacher))
    ls_only = run(kd_criterion(task, kd_alpha=0.0), model, sample)[0]
    loss, _, log, grads = run(criterion, model, sample)
    teacher = criterion._external_teacher[0]
    want, kd = expected_kd_loss(model, teacher, sample, 0.3, 2.0, ls_only)
    assert torch.allclose(loss, want, rtol=1e-5), (loss, want)
    assert torch.allclose(log["kd_loss"], kd, rtol=1e-5)
    assert kd > 0
    # the teacher stays outside the criterion's state, parameters and the gradient
    assert list(criterion.state_dict()) == [] and list(criterion.parameters()) == []
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert grads  # the student learns
    # teacher follows the student's dtype (fp16/bf16 training): here fp64
    model.double()
    run(criterion, model, sample)
    assert next(teacher.parameters()).dtype == torch.float64


def test_padding_is_masked(task, postnorm_teacher):
    """The KD term of a padded batch is the sum of the sentences' own KD terms."""
    model = student(task).eval()
    criterion = kd_criterion(task, kd_alpha=1.0, teacher_path=str(postnorm_teacher))
    dataset = task.dataset("valid")
    items = [dataset[i] for i in range(6)]
    assert len({len(item["target"]) for item in items}) > 1  # padding is present
    with torch.no_grad():
        _, _, together = criterion(model, dataset.collater(items))
        alone = sum(criterion(model, dataset.collater([item]))[2]["kd_loss"] for item in items)
    assert torch.allclose(together["kd_loss"], alone, rtol=1e-4)


def test_wd_model_reuses_its_own_teacher(data_bin, postnorm_teacher, task):
    model = build_wd(data_bin, postnorm_teacher, decoder_layers=1, decoder_embed_dim=16,
                     decoder_ffn_embed_dim=32, decoder_attention_heads=4)
    sample = batch(task)
    criterion = kd_criterion(task, kd_alpha=0.5)  # no --teacher-path: the model has one
    loss, _, log, grads = run(criterion, model, sample)
    assert criterion._external_teacher == []
    assert model.teacher.training  # its mode is restored after the teacher forward
    model.teacher.eval()
    with torch.no_grad():
        teacher_logits = model.teacher(**sample["net_input"])[0]
    assert torch.equal(criterion.teacher_logits(model, sample), teacher_logits)
    assert log["kd_loss"] > 0 and torch.isfinite(loss)
    assert grads and all(".teacher." not in n and not n.startswith("teacher.") for n in grads)


def test_clear_errors(task, tmp_path):
    with pytest.raises(WDSetupError, match="--teacher-path"):
        run(kd_criterion(task, kd_alpha=0.5), student(task), batch(task))
    with pytest.raises(WDSetupError, match="no such file"):
        run(kd_criterion(task, kd_alpha=0.5, teacher_path=str(tmp_path / "nope.pt")),
            student(task), batch(task))
    with pytest.raises(WDSetupError, match="--kd-alpha"):
        kd_criterion(task, kd_alpha=1.5)
    with pytest.raises(WDSetupError, match="--kd-temperature"):
        kd_criterion(task, kd_alpha=0.5, kd_temperature=0)


STUDENT_FLAGS = [
    "--encoder-layers", "3", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "4", "--decoder-layers", "1", "--decoder-embed-dim", "16",
    "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "4",
]
KD_FLAGS = ["--criterion", "kd_label_smoothed_cross_entropy", "--kd-alpha", "0.5",
            "--kd-temperature", "2", "--user-dir", USER_DIR, "--disable-validation"]


def train_flags():
    flags = list(TRAIN_FLAGS)
    i = flags.index("--criterion")
    del flags[i:i + 2]
    return flags


def test_fairseq_train_kd_baseline_resumes(data_bin, postnorm_teacher, tmp_path):
    """A plain student with --teacher-path: checkpoints hold no teacher and resume.
    (tests/test_recipes.py trains phase 1 with this criterion through fairseq-train.)"""
    common = [data_bin, "--arch", "transformer", *STUDENT_FLAGS, *train_flags(), *KD_FLAGS,
              "--teacher-path", postnorm_teacher, "--save-dir", tmp_path]
    one_thread = {"OMP_NUM_THREADS": "1"}  # tiny model on shared cores
    run_cli("fairseq-train", *common, "--max-update", "3", env=one_thread)
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert not state.get("criterion")
    assert all(k.startswith(("encoder.", "decoder.")) for k in state["model"])
    out = run_cli("fairseq-train", *common, "--max-update", "5", env=one_thread).stdout
    assert "Loaded checkpoint" in out and "num_updates 5" in out and "kd_loss" in out

