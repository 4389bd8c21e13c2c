"""``--lr-scheduler inverse_sqrt_offset``: fairseq's inverse_sqrt, started ``--update-offset``
updates into its curve.

WD's phase 2 is a new ``fairseq-train`` run (``--finetune-from-model``: fresh Adam and
step counter). With plain inverse_sqrt it warms up again and then decays from its own
step 1, so at total update N it trains at ``sqrt(N / (N - N1))`` times (times the ratio
of the warmups) the rate of a single run of N updates, N1 the phase-1 updates. With this
scheduler and ``--update-offset N1`` plus phase 1's ``--lr``, ``--warmup-updates`` and
``--warmup-init-lr``, update ``s`` of phase 2 gets the rate of update ``N1 + s`` of that
single run: the two phases follow one curve, as the other arms of a comparison do.
"""

from dataclasses import dataclass, field

from fairseq.optim.lr_scheduler import register_lr_scheduler

from .teacher import WDSetupError
from fairseq.optim.lr_scheduler.inverse_square_root_schedule import (
    InverseSquareRootLRScheduleConfig,
    InverseSquareRootSchedule,
)


@dataclass
class InverseSqrtOffsetConfig(InverseSquareRootLRScheduleConfig):
    update_offset: int = field(
        default=0,
        metadata={"help": "position of this run's step 0 on the inverse_sqrt curve: the "
                          "updates of the earlier stage (WD phase 1) this run continues"},
    )


@register_lr_scheduler("inverse_sqrt_offset", dataclass=InverseSqrtOffsetConfig)
class InverseSqrtOffsetSchedule(InverseSquareRootSchedule):
    """inverse_sqrt evaluated at ``num_updates + update_offset``."""

    def __init__(self, cfg: InverseSqrtOffsetConfig, optimizer):
        if cfg.update_offset < 0:
            raise WDSetupError(f"--update-offset {cfg.update_offset}: a position on the curve is >= 0. "
                               "Fix: pass the number of updates of the stage this run continues")
        super().__init__(cfg, optimizer)
        self.step_update(0)  # the rate of the curve at the offset, not at its start

    def step_update(self, num_updates):
        return super().step_update(num_updates + self.cfg.update_offset)
