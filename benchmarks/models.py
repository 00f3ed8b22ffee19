"""Models and data shared by the benchmarks."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import TensorDataset


class TinyGPT(L.LightningModule):
    """A causal transformer LM: token + position embeddings, pre-norm encoder layers, tied head."""

    def __init__(self, vocab: int = 256, width: int = 128, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.position[:n]
        h = self.norm(self.blocks(h, mask=self.mask[:n, :n], is_causal=True))
        return h @ self.embed.weight.t()

    def _loss(self, batch) -> torch.Tensor:
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def token_data(n: int, context: int = 65, seed: int = 0) -> TensorDataset:
    """Sequences with structure to learn: a random start, then each token = previous + a small step."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 256, (n, 1), generator=g)
    steps = torch.randint(1, 4, (n, context - 1), generator=g)
    return TensorDataset(torch.cat([start, start + steps.cumsum(1)], 1) % 256)
