"""``kd_label_smoothed_cross_entropy``: label-smoothed CE plus word-level KD.

    loss = (1 - α) · LS-CE(student, reference) + α · T² · KL(p_teacher,T || p_student,T)

summed over the target tokens that are not padding (docs/method.md section 4). Softmax
and KL are computed in fp32. With α = 0 the loss is exactly fairseq's
``label_smoothed_cross_entropy`` and no teacher is needed.

The teacher's distribution comes from the teacher's own weights:

* a WD phase-1 model (``--arch wd_transformer*``) already holds its frozen teacher
  in ``model.teacher``; it is reused, no second copy is loaded;
* a plain student (the KD baseline) reads the teacher from ``--teacher-path``. It
  is kept in a plain list, so it is never in ``criterion.state_dict()`` or
  ``criterion.parameters()``: checkpoints hold no teacher, resuming works, and
  the optimizer never sees it. It runs in eval mode on the student's device and
  dtype.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.logging import metrics
from torch import Tensor, nn

from .teacher import WDSetupError, load_teacher


@dataclass
class KDLabelSmoothedCrossEntropyCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    kd_alpha: float = field(
        default=0.5,
        metadata={"help": "weight α of the word-level KD term; 0 gives label_smoothed_cross_entropy"},
    )
    kd_temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature T of teacher and student in the KD term"}
    )
    teacher_path: Optional[str] = field(
        default=None,
        metadata={"help": "stock fairseq Transformer checkpoint of the teacher (not needed "
                  "for --arch wd_transformer*, whose teacher is inside the model)"},
    )


def kd_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                  mask: Tensor) -> Tensor:
    """Σ over unmasked tokens of KL(softmax(teacher/T) || softmax(student/T)), fp32.

    Args:
        student_logits, teacher_logits: (N, V), any float dtype.
        mask: (N,) bool, True for tokens that count.
    Returns: a scalar (fp32).
    """
    student = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="sum", log_target=True)


@register_criterion(
    "kd_label_smoothed_cross_entropy", dataclass=KDLabelSmoothedCrossEntropyCriterionConfig
)
class KDLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, kd_alpha, kd_temperature,
                 teacher_path=None, ignore_prefix_size=0, report_accuracy=False):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        if not 0.0 <= kd_alpha <= 1.0:
            raise WDSetupError(f"--kd-alpha {kd_alpha}: must be in [0, 1]. Fix: e.g. --kd-alpha 0.5")
        if kd_temperature <= 0:
            raise WDSetupError(
                f"--kd-temperature {kd_temperature}: must be > 0. Fix: e.g. --kd-temperature 1"
            )
        self.alpha = kd_alpha
        self.temperature = kd_temperature
        self.teacher_path = teacher_path
        self._external_teacher = []  # a plain list: never a submodule, never saved

    @classmethod
    def add_args(cls, parser):
        """The criterion's flags; ``--teacher-path`` is skipped when the model
        (``wd_transformer``) already defines it: both then read the same value.

        argparse has no public way to ask whether a parser has a flag; its private
        ``_option_string_actions`` is the least bad one (adding the flag twice raises,
        and fairseq adds the model's flags before the criterion's)."""
        if "--teacher-path" in parser._option_string_actions:
            gen_parser_from_dataclass(parser, _FlagsWithoutTeacherPath())
        else:
            gen_parser_from_dataclass(parser, KDLabelSmoothedCrossEntropyCriterionConfig())

    def teacher(self, model: nn.Module) -> nn.Module:
        """The teacher for ``model``: its own (WD) or the one of ``--teacher-path``."""
        if getattr(model, "is_wd_model", False):
            return model.teacher
        if not self._external_teacher:
            if not self.teacher_path:
                raise WDSetupError(
                    f"--kd-alpha {self.alpha} needs a teacher, and the model "
                    f"({type(model).__name__}) holds none. Fix: pass --teacher-path "
                    "TEACHER.pt (a stock fairseq Transformer checkpoint), or --kd-alpha 0"
                )
            teacher, _ = load_teacher(self.teacher_path, self.task)
            self._external_teacher.append(teacher.eval())
        teacher = self._external_teacher[0]
        reference = next(model.parameters())
        first = next(teacher.parameters())
        if first.device != reference.device or first.dtype != reference.dtype:
            teacher.to(device=reference.device, dtype=reference.dtype)
        return teacher

    @torch.no_grad()
    def teacher_logits(self, model: nn.Module, sample) -> Tensor:
        """Teacher logits (B, T, V) for the sample's inputs, teacher in eval mode."""
        teacher = self.teacher(model)
        was_training = teacher.training
        teacher.eval()
        try:
            return teacher(**sample["net_input"])[0]
        finally:
            teacher.train(was_training)

    def forward(self, model, sample, reduce=True):
        """Returns (loss, sample size, logging output), as label_smoothed_cross_entropy."""
        net_output = model(**sample["net_input"])
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        if self.alpha > 0:
            kd_loss = self.compute_kd_loss(model, net_output, sample)
            loss = (1.0 - self.alpha) * loss + self.alpha * self.temperature ** 2 * kd_loss
            logging_output.update(loss=loss.data, kd_loss=kd_loss.data)
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    def compute_kd_loss(self, model, net_output, sample) -> Tensor:
        """Σ over target tokens of KL(teacher_T || student_T) (scalar, fp32)."""
        student = net_output[0]
        teacher = self.teacher_logits(model, sample)
        target = model.get_targets(sample, net_output)
        if self.ignore_prefix_size > 0:
            student = student[:, self.ignore_prefix_size:, :]
            teacher = teacher[:, self.ignore_prefix_size:, :]
            target = target[:, self.ignore_prefix_size:]
        vocab = student.size(-1)
        mask = target.reshape(-1).ne(self.padding_idx)
        return kd_divergence(
            student.reshape(-1, vocab), teacher.reshape(-1, vocab), self.temperature, mask
        )

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """Metrics of label_smoothed_cross_entropy plus ``kd_loss`` (bits per token)."""
        super().reduce_metrics(logging_outputs)
        if any("kd_loss" in log for log in logging_outputs):
            kd_sum = sum(log.get("kd_loss", 0) for log in logging_outputs)
            ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
            metrics.log_scalar("kd_loss", kd_sum / ntokens / math.log(2), ntokens, round=3)


class _FlagsWithoutTeacherPath(KDLabelSmoothedCrossEntropyCriterionConfig):
    """The criterion's flags for a parser where the model defines ``--teacher-path``."""

    def _get_all_attributes(self):
        return [k for k in super()._get_all_attributes() if k != "teacher_path"]
