"""ckptavg with the Hugging Face Trainer: a tiny GPT-2 (built from a config, no download) learns
bytes of the Python standard library at a constant learning rate, with CheckpointAveragerCallback.

    python examples/hf_trainer.py                 # 400 steps, about a minute on 2 cores
    python examples/hf_trainer.py --steps 60      # a quick look

At every evaluation the Trainer logs eval_loss and the merged model's eval_merged_loss; after
train() the model holds the merge, and <out>/merged/ is a from_pretrained folder.
"""

import argparse
import sysconfig
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from ckptavg.hf import CheckpointAveragerCallback

CONTEXT = 64


class StdlibBytes(torch.utils.data.Dataset):
    def __init__(self, names: list[str], windows: int):
        root = Path(sysconfig.get_paths()["stdlib"])
        data = torch.tensor(list(b"\n".join((root / n).read_bytes() for n in names)), dtype=torch.long)
        starts = torch.linspace(0, data.numel() - CONTEXT - 1, windows).long().tolist()
        self.ids = torch.stack([data[s : s + CONTEXT] for s in starts])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="runs/hf_trainer")
    options = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    train = StdlibBytes(["argparse.py", "textwrap.py", "shlex.py", "difflib.py"], 4000)
    val = StdlibBytes(["fnmatch.py", "bisect.py"], 128)

    averager = CheckpointAveragerCallback(window=8)  # the cadence follows max_steps: the last tenth of the run
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=options.out,
            max_steps=options.steps,
            per_device_train_batch_size=16,
            learning_rate=2e-3,
            lr_scheduler_type="constant",  # no decay to plan: the merge stands in for the cooldown
            eval_strategy="steps",
            eval_steps=max(options.steps // 4, 1),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=train,
        eval_dataset=val,
        callbacks=[averager],
    )
    trainer.train()

    merged = [e for e in trainer.state.log_history if "eval_merged_loss" in e][-1]
    print(f"eval_merged_loss at step {merged['step']}: {merged['eval_merged_loss']:.4f}")
    print(f"raw vs merged at the end: {averager.final_metrics}")
    reloaded = AutoModelForCausalLM.from_pretrained(averager.merged_path)
    print(f"reloaded from {averager.merged_path}: {sum(p.numel() for p in reloaded.parameters())} parameters")


if __name__ == "__main__":
    main()
