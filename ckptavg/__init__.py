"""ckptavg: the annealed model's quality from a rolling window of constant-LR checkpoints.

Every merge is a vector of coefficients over the stored snapshots, applied by one streaming
weighted-sum kernel; SMA, WMA and EMA differ only in how they choose the coefficients.
"""

from __future__ import annotations

import importlib
import warnings

from .ensembles import Ensemble, distill
from .errors import CkptavgWarning, CorruptSnapshotError, FolderLockedError
from .learning import learn_weights, np_merge
from .methods import MergeSpec, coefficients, method_names
from .offline import consolidate, load_merged_weights, merge_state_dicts
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
    "MergeSpec",
    "RecoveryError",
    "RecoveryEvent",
    "RecoveryPolicy",
    "SpikeGuard",
    "coefficients",
    "consolidate",
    "distill",
    "evaluator",
    "learn_weights",
    "load_merged_weights",
    "load_state",
    "merge_state_dicts",
    "method_names",
    "np_merge",
    "select",
]
__version__ = "0.2.0.dev0"

# Names that left the top-level namespace in 0.2: they keep working, with a DeprecationWarning, for
# one release. name -> (module, attribute, the spelling to use instead).
_MOVED = {
    "sma": ("ckptavg.methods", "sma", 'ckptavg.coefficients("sma", n)'),
    "wma": ("ckptavg.methods", "wma", 'ckptavg.coefficients("wma", n)'),
    "ema": ("ckptavg.methods", "ema", 'ckptavg.coefficients("ema", n, alpha)'),
    "Layout": ("ckptavg.layout", "Layout", "ckptavg.layout.Layout (an internal)"),
    "ensemble": ("ckptavg.ensembles", "ensemble", "ckptavg.Ensemble(model, states)"),
    "distillation_loss": ("ckptavg.ensembles", "distillation_loss", "ckptavg.ensembles.distillation_loss"),
    "load_state_file": ("ckptavg.offline", "load_state_file", "ckptavg.offline.load_state_file"),
    "merge_method": ("ckptavg.methods", "merge_method", "ckptavg.methods.merge_method"),
}


def __getattr__(name: str) -> object:
    # The Lightning adapter is imported on first use, so plain-PyTorch users never import Lightning.
    if name == "CheckpointAverager":
        try:
            from .lightning import CheckpointAverager
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] not in ("lightning", "torchmetrics"):
                raise
            raise ModuleNotFoundError(
                f"CheckpointAverager needs Lightning ({err.name} is not installed): pip install 'ckptavg[lightning]'",
                name=err.name,
            ) from err
        return CheckpointAverager
    if name in _MOVED:
        module, attribute, instead = _MOVED[name]
        warnings.warn(f"ckptavg.{name} is deprecated: use {instead}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")
