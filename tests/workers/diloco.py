"""DiLoCo and SPARTA with 2 real gloo processes.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/diloco.py OUT [killed]

Each rank saves what it saw to OUT/rank<r>.pt; the test compares against float64 references.
With ``killed``, rank 1 exits in the middle of a round and rank 0 must fail with ReplicaLost.
"""

import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ckptavg.distributed import DiLoCo, ReplicaLost, Sparta


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def train(model, optimizer, steps, rank, start=0):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 * rank + step)
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def recorded(model, optimizer, run):
    """Register hooks around the DiLoCo/SPARTA hook (built by ``run``): the weights after each inner
    step before the sync, and after it."""
    before, after = [], []
    optimizer.register_step_post_hook(lambda *a: before.append(flat(model)))
    syncer = run()
    optimizer.register_step_post_hook(lambda *a: after.append(flat(model)))
    return syncer, before, after


def main() -> None:
    out = Path(sys.argv[1])
    killed = len(sys.argv) > 2 and sys.argv[2] == "killed"
    mismatch = len(sys.argv) > 2 and sys.argv[2] == "mismatch"
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    result = {}

    if mismatch:  # rank 1's model is another shape: both ranks refuse before training
        model = net(0) if rank == 0 else nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        try:
            DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=3)
        except ValueError as err:
            result = {"error": str(err)}
        torch.save(result, out / f"rank{rank}.pt")
        dist.destroy_process_group()
        return

    if killed:
        model = net(rank)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        DiLoCo(model, optimizer, sync_every=3)
        if rank == 1:
            train(model, optimizer, 2, rank)
            os._exit(0)  # gone in the middle of a round
        start = time.monotonic()
        try:
            train(model, optimizer, 6, rank)
        except ReplicaLost as err:
            result = {"lost": str(err), "seconds": time.monotonic() - start}
        torch.save(result, out / f"rank{rank}.pt")
        os._exit(0)

    # 1. Plain averaging: outer SGD(lr=1, momentum=0); replicas built from different seeds.
    model = net(rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    diloco, before, after = recorded(
        model,
        optimizer,
        lambda: DiLoCo(model, optimizer, sync_every=3, outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0)),
    )
    result["start"] = flat(model)
    train(model, optimizer, 6, rank)
    result["plain"] = {"before": before, "after": after, "bytes": diloco.bytes_sent}
    diloco.close()

    # 2. The default outer step (Nesterov): the global weights before and after, and the locals.
    model = net(7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    diloco, before, after = recorded(model, optimizer, lambda: DiLoCo(model, optimizer, sync_every=2))
    result["nesterov_start"] = flat(model)
    train(model, optimizer, 6, rank)
    result["nesterov"] = {"before": before, "after": after}
    diloco.close()

    # 3. Streaming: 2 fragments, sync_every=4 -> fragment 0 at steps 4, 8; fragment 1 at 2, 6.
    model = net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    diloco, before, after = recorded(
        model,
        optimizer,
        lambda: DiLoCo(model, optimizer, sync_every=4, fragments=2, communication_dtype=torch.bfloat16),
    )
    train(model, optimizer, 8, rank)
    result["fragments"] = {"after": after, "groups": diloco.fragments, "bytes": diloco.bytes_sent}
    diloco.close()

    # 4. SPARTA with fraction 1.0 is averaging after every step; the indices agree across ranks.
    model = net(rank + 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparta, before, after = recorded(model, optimizer, lambda: Sparta(model, optimizer, fraction=1.0))
    train(model, optimizer, 3, rank)
    result["sparta_full"] = {"before": before, "after": after}
    sparta.close()
    model = net(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparta = Sparta(model, optimizer, fraction=0.1, seed=4)
    probe = Sparta(model, torch.optim.SGD(model.parameters(), lr=0.0), fraction=0.1, seed=4)
    result["sparta_indices"] = probe.indices()
    probe.close()
    train(model, optimizer, 5, rank)
    result["sparta_partial"] = {"weights": flat(model), "bytes": sparta.bytes_sent, "step": sparta.step}
    sparta.close()

    # 5. Killed and resumed mid-round (DiLoCo + SPARTA together) ends bit-identical.
    def build(state=None):
        model = net(11)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        diloco = DiLoCo(model, optimizer, sync_every=4, fragments=2, fragment_delay=1)
        sparta = Sparta(model, optimizer, fraction=0.2, seed=1)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            diloco.load_state_dict(state["diloco"])
            sparta.load_state_dict(state["sparta"])
        return model, optimizer, diloco, sparta

    model, optimizer, diloco, sparta = build()
    train(model, optimizer, 11, rank)
    diloco.flush()
    whole = flat(model)
    diloco.close(), sparta.close()
    model, optimizer, diloco, sparta = build()
    train(model, optimizer, 5, rank)
    state = {"diloco": diloco.state_dict(), "sparta": sparta.state_dict()}
    state |= {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": optimizer.state_dict()}
    diloco.close(), sparta.close()
    model, optimizer, diloco, sparta = build(state)
    train(model, optimizer, 6, rank, start=5)
    diloco.flush()
    result["resume"] = {"whole": whole, "resumed": flat(model)}

    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
