"""wd_fairseq: Weight Distillation (Lin et al., ACL 2021) as a fairseq plugin.

Load with ``fairseq-train --user-dir <path of this package>``; importing it
registers the ``wd_transformer`` model and its presets, and allows fairseq
checkpoints to load under torch >= 2.6 with weights_only (see safe_loading).
"""

from .safe_loading import allow_fairseq_checkpoints, trust_rank0_broadcasts

allow_fairseq_checkpoints()
trust_rank0_broadcasts()

from . import model  # noqa: E402,F401  (registers wd_transformer)
from . import criterion  # noqa: E402,F401  (registers kd_label_smoothed_cross_entropy)
from . import lr_schedule  # noqa: E402,F401  (registers inverse_sqrt_offset)

__version__ = "0.1.0"
