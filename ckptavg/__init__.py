"""ckptavg: the annealed model's quality from a rolling window of constant-LR checkpoints.

Every merge is a vector of coefficients over the stored snapshots, applied by one streaming
weighted-sum kernel; SMA, WMA and EMA differ only in how they choose the coefficients.
"""

from .ensembles import Ensemble, distill, distillation_loss, ensemble
from .errors import CkptavgWarning, CorruptSnapshotError, FolderLockedError
from .layout import Layout
from .learning import learn_weights, np_merge
from .methods import coefficients, ema, merge_method, method_names, sma, wma
from .offline import consolidate, load_merged_weights, load_state_file, merge_state_dicts
from .recovery import RecoveryError, RecoveryEvent, RecoveryPolicy, SpikeGuard
from .selection import evaluator, select
from .window import CheckpointWindow, load_state

__all__ = [
    "CheckpointAverager",
    "CheckpointWindow",
    "CkptavgWarning",
    "CorruptSnapshotError",
    "Ensemble",
    "FolderLockedError",
    "Layout",
    "RecoveryError",
    "RecoveryEvent",
    "RecoveryPolicy",
    "SpikeGuard",
    "coefficients",
    "consolidate",
    "distill",
    "distillation_loss",
    "ema",
    "ensemble",
    "evaluator",
    "learn_weights",
    "load_merged_weights",
    "load_state",
    "load_state_file",
    "merge_method",
    "merge_state_dicts",
    "method_names",
    "np_merge",
    "select",
    "sma",
    "wma",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The Lightning adapter is imported on first use, so plain-PyTorch users never import Lightning.
    if name == "CheckpointAverager":
        try:
            from .callback import CheckpointAverager
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] not in ("lightning", "torchmetrics"):
                raise
            raise ModuleNotFoundError(
                f"CheckpointAverager needs Lightning ({err.name} is not installed): pip install 'ckptavg[lightning]'",
                name=err.name,
            ) from err
        return CheckpointAverager
    raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")
