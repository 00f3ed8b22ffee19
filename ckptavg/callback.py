"""Deprecated location: the Lightning callback is :class:`ckptavg.lightning.CheckpointAverager`
(also ``ckptavg.CheckpointAverager``). This module keeps the old import working for one release."""

from __future__ import annotations

import warnings

warnings.warn(
    "ckptavg.callback is deprecated: import CheckpointAverager from ckptavg (or ckptavg.lightning)",
    DeprecationWarning,
    stacklevel=2,
)

from .lightning.callback import CheckpointAverager  # noqa: E402

__all__ = ["CheckpointAverager"]
