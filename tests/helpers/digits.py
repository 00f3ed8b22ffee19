"""scikit-learn's digits as tensors, and a plain training loop for small classifiers on them
(framework-free: no Lightning)."""

from __future__ import annotations

import torch


def digits_tensors(shuffle_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 images (scaled to [0, 1]) and labels; shuffled by ``shuffle_seed`` if given."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    if shuffle_seed is not None:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(shuffle_seed))
        x, y = x[order], y[order]
    return x, y


def train_classifier(model, x, y, steps, *, lr=3e-3, batch=32, seed=0, optimizer=None, blast=()):
    """AdamW (or ``optimizer``) on random batches drawn by ``seed``; the learning rate is 1000x at
    the step indices in ``blast`` (a divergence on purpose). Returns the optimizer, to go on."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * (1000 if step in blast else 1)
        idx = torch.randint(0, len(x), (batch,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer
