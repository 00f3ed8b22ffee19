"""Models and data shared by the benchmarks."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import TensorDataset


class TinyGPT(L.LightningModule):
    """The benchmarks' small Lightning LM: a ByteGPT (below) of 2 layers over 64 tokens."""

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.net = ByteGPT(width, layers, heads, context)

    def loss(self, batch) -> torch.Tensor:
        (tokens,) = batch
        return self.net.loss(tokens)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def token_data(n: int, context: int = 65, seed: int = 0) -> TensorDataset:
    """Sequences with structure to learn: a random start, then each token = previous + a small step."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 256, (n, 1), generator=g)
    steps = torch.randint(1, 4, (n, context - 1), generator=g)
    return TensorDataset(torch.cat([start, start + steps.cumsum(1)], 1) % 256)


# -- a byte-level language model on the Python standard library's own source --------------------


def stdlib_bytes(val_every: int = 10) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The top-level ``*.py`` files of this interpreter's standard library, sorted by name, as
    bytes: every ``val_every``-th file is validation, the rest training. Real text every machine
    has, no download."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if len(files) < 20:
        raise RuntimeError(f"found only {len(files)} standard-library files in {root}")
    train, val = [], []
    for i, path in enumerate(files):
        (val if i % val_every == val_every - 1 else train).append(path.read_bytes())
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(val), [p.name for p in files]


def batch_at(data: torch.Tensor, step: int, batch_size: int, context: int, seed: int = 0) -> torch.Tensor:
    """The training batch of optimizer step ``step``: random windows drawn from a generator seeded
    by (seed, step) alone, so any run, branch or resume sees exactly the same data at a step."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=g)
    return torch.stack([data[s : s + context + 1] for s in starts.tolist()])


def validation_batches(data: torch.Tensor, count: int, batch_size: int, context: int) -> list[torch.Tensor]:
    """Fixed, evenly spaced validation windows."""
    starts = torch.linspace(0, data.numel() - context - 2, count * batch_size).long().tolist()
    windows = torch.stack([data[s : s + context + 1] for s in starts])
    return list(windows.split(batch_size))


class ByteGPT(nn.Module):
    """A small GPT: byte embeddings, learned positions, pre-norm causal transformer blocks, a tied
    output head."""

    def __init__(self, width: int = 128, layers: int = 4, heads: int = 4, context: int = 128):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.position[:n]
        h = self.norm(self.blocks(h, mask=self.mask[:n, :n], is_causal=True))
        return h @ self.embed.weight.t()

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
