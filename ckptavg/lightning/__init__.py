"""The Lightning adapter: ``CheckpointAverager``, a callback over the framework-neutral
:class:`ckptavg.training.TrainingSession`. The only package of ckptavg that imports Lightning;
every private Lightning name it reads is in :mod:`ckptavg.lightning._internals`.

Install with ``pip install "ckptavg[lightning]"``.
"""

from .callback import CheckpointAverager
from .diloco import DiLoCoStrategy

__all__ = ["CheckpointAverager", "DiLoCoStrategy"]
