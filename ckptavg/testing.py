"""Deprecated location: :class:`InjectDivergence` is a Lightning callback and lives in
:mod:`ckptavg.lightning.testing`. This module keeps the old import working for one release."""

from __future__ import annotations

import warnings

warnings.warn(
    "ckptavg.testing is deprecated: import InjectDivergence from ckptavg.lightning.testing",
    DeprecationWarning,
    stacklevel=2,
)

from .lightning.testing import InjectDivergence  # noqa: E402

__all__ = ["InjectDivergence"]
