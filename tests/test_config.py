"""Issue 12: every argument form the README shows works from a LightningCLI YAML file (a real
LightningCLI, jsonargparse parsing the callback's signature)."""

from pathlib import Path

import pytest
from helpers.lit import Regression, RegressionData
from lightning.pytorch.cli import LightningCLI

from ckptavg import CheckpointAverager, RecoveryPolicy

TRAINER = """
trainer:
  max_steps: 6
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  accelerator: cpu
  default_root_dir: {root}
  callbacks:
    - class_path: ckptavg.CheckpointAverager
      init_args:
        window: 4
        every_n_steps: 2
        dirpath: {root}/ckptavg
{options}
"""


def fit_from_yaml(tmp_path: Path, options: str) -> CheckpointAverager:
    config = tmp_path / "config.yaml"
    config.write_text(
        TRAINER.format(root=tmp_path, options="\n".join(" " * 8 + line for line in options.strip().splitlines()))
    )
    cli = LightningCLI(Regression, RegressionData, args=["fit", "--config", str(config)], save_config_callback=None)
    (averager,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, CheckpointAverager)]
    assert averager.window.steps == [2, 4, 6]  # it really ran
    return averager


@pytest.mark.parametrize(
    "options, expected",
    [
        ("recover: {threshold: 8.0, max_restores: 5}", RecoveryPolicy(threshold=8.0, max_restores=5)),
        ("recover:\n  threshold: 8.0\n  patience: 20", RecoveryPolicy(threshold=8.0, patience=20)),
        (
            "recover:\n  class_path: ckptavg.RecoveryPolicy\n  init_args:\n    lr_scale: 0.5\n    lr_scale_steps: 100",
            RecoveryPolicy(lr_scale=0.5, lr_scale_steps=100),
        ),
        ("recover: true", RecoveryPolicy()),
        ("recover: false", None),
        ("", RecoveryPolicy()),
    ],
    ids=["inline-mapping", "block-mapping", "class-path", "true", "false", "default"],
)
def test_recover_forms_from_yaml(tmp_path, options, expected):
    assert fit_from_yaml(tmp_path, options).recovery == expected


def test_merge_options_from_yaml(tmp_path):
    averager = fit_from_yaml(tmp_path, "merge: ema\ndecay: 0.9\nstorage: disk")
    assert averager.merge == "ema" and averager.alpha == pytest.approx(0.1) and averager.storage == "disk"


def test_a_registered_method_and_its_options_from_yaml(tmp_path):
    averager = fit_from_yaml(tmp_path, "merge: decay\nmerge_options: {shape: 1-sqrt}\nrecover: {merge: wma}")
    assert averager.merge == "decay" and averager.merge_options == {"shape": "1-sqrt"}
    assert averager.recovery.merge == "wma"


@pytest.mark.parametrize(
    "options, expected",
    [
        ("candidates: [wma, ema]\nselect: val_loss", {"wma": ("wma", {}), "ema": ("ema", {})}),
        (
            "candidates:\n  cos: {method: decay, shape: cosine}\n  ema5: {method: ema, alpha: 0.5}\nselect: val_loss",
            {"cos": ("decay", {"shape": "cosine"}), "ema5": ("ema", {})},
        ),
    ],
    ids=["list", "mapping"],
)
def test_candidates_and_select_from_yaml(tmp_path, options, expected):
    averager = fit_from_yaml(tmp_path, options)
    assert {name: (spec.method, spec.options) for name, spec in averager.candidates.items()} == expected
    assert averager.selection["by"] == "val_loss" and averager.selection["picked"] in {"sma", *expected}
