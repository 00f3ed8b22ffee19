"""A tiny GPT-2 (built from a config: no download) learning bytes of the Python standard library,
and the Trainer around it, for the Hugging Face adapter's tests and workers."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

CONTEXT = 32


class Bytes(torch.utils.data.Dataset):
    """Fixed windows of ``CONTEXT`` bytes of stdlib source; labels are the inputs (the model shifts)."""

    def __init__(self, files: list[Path], windows: int, offset: int = 0):
        data = b"".join(path.read_bytes() for path in files)[offset : offset + windows * CONTEXT]
        self.ids = torch.tensor(list(data), dtype=torch.long).view(windows, CONTEXT)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def datasets(train_windows: int = 512, val_windows: int = 64) -> tuple[Bytes, Bytes]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py")]
    return Bytes(files, train_windows), Bytes(files, val_windows, offset=train_windows * CONTEXT)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=True)
    return GPT2LMHeadModel(config)


def arguments(output_dir: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=40,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        eval_strategy="steps",
        eval_steps=20,
        save_strategy="no",
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def trainer(output_dir: Path, callbacks: list[Any], model: GPT2LMHeadModel | None = None, **overrides: Any) -> Trainer:
    train, val = datasets()
    eval_dataset = overrides.pop("eval_dataset", val)
    return Trainer(
        model=model if model is not None else tiny_gpt2(),
        args=arguments(output_dir, **overrides),
        train_dataset=train,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
    )


def mean_loss(model: torch.nn.Module, dataset: Bytes, batch_size: int = 16) -> float:
    """The Trainer's evaluation loss written out: per batch, the summed next-token cross-entropy
    over the number of label tokens (the Trainer divides by every label, ``CONTEXT`` per row,
    though the shift leaves ``CONTEXT - 1`` predicted); then the mean over rows."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            ids = dataset.ids[start : start + batch_size]
            logits = model(input_ids=ids).logits[:, :-1].double()
            summed = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(summed) / ids.numel() * len(ids)
    return total / len(dataset)
