"""The Hugging Face Trainer adapter: ``CheckpointAveragerCallback``, a ``TrainerCallback`` over the
framework-neutral :class:`ckptavg.training.TrainingSession`. The only package of ckptavg that
imports transformers; every private Trainer name it reads is in :mod:`ckptavg.hf._internals`.

Install with ``pip install "ckptavg[hf]"``.
"""

try:
    from .callback import CheckpointAveragerCallback
    from .diloco import DiLoCoCallback
except ModuleNotFoundError as err:  # pragma: no cover - exercised without transformers installed
    if (err.name or "").split(".")[0] not in ("transformers", "accelerate"):
        raise
    raise ModuleNotFoundError(
        f"ckptavg.hf needs transformers and accelerate ({err.name} is not installed): pip install 'ckptavg[hf]'",
        name=err.name,
    ) from err

__all__ = ["CheckpointAveragerCallback", "DiLoCoCallback"]
