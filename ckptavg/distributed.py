"""Training across machines with little communication, by merging: DiLoCo, Streaming DiLoCo, SPARTA.

Every replica trains on its own; what crosses the network is a merge.

- :class:`DiLoCo` (arXiv 2311.08105): every ``sync_every`` inner steps, the pseudo-gradient
  ``global - local`` is averaged over the replicas and an outer optimizer (Nesterov SGD by
  default) steps the global weights with it; the replicas continue from the new global weights.
  With ``fragments > 1`` it is Streaming DiLoCo (arXiv 2501.18512): the parameters are split into
  fragments synced at staggered steps, each fragment's all-reduce overlapping ``fragment_delay``
  inner steps of compute, optionally in ``communication_dtype`` (bfloat16 halves the bytes).
- :class:`Sparta` (SPARTA): after every ``every`` inner steps, a random ``fraction`` of the
  parameters' elements, the same on every replica (a shared generator), is averaged in place.

Both run from a post-hook on the inner optimizer's ``step``: the user's loop is unchanged. They
are built on ``torch.distributed`` process groups (gloo on CPU, NCCL on GPU); the bytes each
replica hands to a collective are counted in ``bytes_sent``.

Buffers: floating buffers (BatchNorm statistics) are averaged at each DiLoCo sync, without an
outer step; integer buffers (``num_batches_tracked``) stay local. SPARTA averages parameters only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import check_int
from .sharding import collective_device

OuterFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]

DEFAULT_OUTER = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
"""DiLoCo's outer optimizer (the paper's setting): ``SGD(lr=0.7, momentum=0.9, nesterov=True)``."""


class ReplicaLost(RuntimeError):
    """A collective between the replicas failed: a replica died, or the network did."""


def _group_size(process_group: Any, who: str) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{who} needs an initialised torch.distributed process group (torch.distributed.init_process_group, "
            "or launch with torchrun)"
        )
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _collective(what: str, call: Callable[[], Any]) -> Any:
    """Run one collective; a failure (a replica gone, past the process group's timeout) is a
    :class:`ReplicaLost` that says so, instead of a bare backend error."""
    try:
        return call()
    except (RuntimeError, ValueError) as err:  # gloo and NCCL raise RuntimeError (DistBackendError)
        raise ReplicaLost(
            f"{what} failed: a replica stopped or the connection broke ({type(err).__name__}: {err}). The others stop "
            "here instead of waiting; restart every replica from the last checkpoint"
        ) from err


def _check_same_model(model: nn.Module, process_group: Any, who: str) -> None:
    """Every replica must hold the same parameters (names, shapes, dtypes): checked before training."""
    mine = [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()]
    gathered: list[Any] = [None] * dist.get_world_size(process_group)
    _collective(f"{who}: comparing the replicas' models", lambda: dist.all_gather_object(gathered, mine, process_group))
    for rank, theirs in enumerate(gathered):
        if theirs != mine:
            differ = next(
                (f"{a} vs {b}" for a, b in zip(mine, theirs, strict=False) if a != b),
                f"{len(mine)} vs {len(theirs)} parameters",
            )
            raise ValueError(f"{who}: rank {rank}'s model differs from this one's: {differ}")


def _broadcast_from_rank0(tensors: Iterable[Tensor], process_group: Any, who: str) -> None:
    """Make every replica start from rank 0's values (whatever its seed)."""
    device = collective_device(process_group)
    src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    with torch.no_grad():
        for tensor in tensors:
            staged = tensor.detach().to(device, copy=True)
            _collective(
                f"{who}: broadcasting rank 0's weights", functools.partial(dist.broadcast, staged, src, process_group)
            )
            tensor.copy_(staged)


def _hooked(optimizer: torch.optim.Optimizer, hook: Callable[[], None]) -> Any:
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: hook())


class DiLoCo:
    """DiLoCo and Streaming DiLoCo over a ``torch.distributed`` process group.

    Args:
        model: this replica's model (not wrapped in DDP: replicas do not all-reduce gradients).
        inner_optimizer: the optimizer the training loop steps; each of its steps is one inner step.
        sync_every: inner steps between two syncs of each fragment (DiLoCo's H).
        outer_optimizer: a factory called with the global weights' tensors; default
            :data:`DEFAULT_OUTER` (the paper's, made for thousands of outer steps). For short runs
            ``functools.partial(torch.optim.SGD, lr=1.0)``, plain periodic averaging, does better
            (``docs/distributed.md``).
        fragments: Streaming DiLoCo's fragments (1: plain DiLoCo). Fragment ``f`` syncs at the inner
            steps ``f * sync_every / fragments (mod sync_every)``; ``sync_every`` must be a multiple.
        fragment_delay: inner steps a fragment's all-reduce overlaps with training (0: wait at once).
            The fragment then takes the new global weights plus the inner progress made meanwhile.
        process_group: the replicas' group (default: the world).
        communication_dtype: the dtype of the pseudo-gradients on the wire (``torch.bfloat16``
            halves the bytes); the global weights and the outer step stay in float32.

    Example::

        diloco = DiLoCo(model, inner_optimizer, sync_every=50)
        for batch in loader:
            loss = model(batch).loss
            loss.backward()
            inner_optimizer.step()          # every 50th step also runs the outer step
            inner_optimizer.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        *,
        sync_every: int,
        outer_optimizer: OuterFactory | None = None,
        fragments: int = 1,
        fragment_delay: int = 0,
        process_group: Any = None,
        communication_dtype: torch.dtype | None = None,
    ):
        _check_diloco(sync_every, fragments, fragment_delay, communication_dtype)
        self.rank, self.world = _group_size(process_group, "DiLoCo")
        self.model, self.group = model, process_group
        self.sync_every, self.fragment_delay = sync_every, fragment_delay
        self.communication_dtype = communication_dtype
        self.device = collective_device(process_group)
        _check_same_model(model, process_group, "DiLoCo")
        parameters: list[Tensor] = list(model.parameters())
        _broadcast_from_rank0([*parameters, *model.buffers()], process_group, "DiLoCo")
        pin = torch.cuda.is_available() and any(p.is_cuda for p in parameters)
        # The global weights and the outer optimizer live in host memory, in float32.
        self.global_params = [
            p.detach().to("cpu", torch.float32, copy=True).pin_memory()
            if pin
            else p.detach().to("cpu", torch.float32, copy=True)
            for p in parameters
        ]
        self.outer = (outer_optimizer or DEFAULT_OUTER)(self.global_params)
        self._local = parameters
        self.fragments = _split(parameters, fragments)
        self.offsets = [f * sync_every // fragments for f in range(fragments)]
        self.step = 0  # inner steps taken
        self.bytes_sent = 0
        self._pending: dict[int, tuple[int, Any, Tensor, list[Tensor]]] = {}  # fragment -> (due, work, flat, snapshot)
        self._hook = _hooked(inner_optimizer, self._after_inner_step)

    def _after_inner_step(self) -> None:
        self.step += 1
        for fragment, offset in enumerate(self.offsets):
            if fragment in self._pending and self._pending[fragment][0] == self.step:
                self._finish(fragment)
            if (self.step - offset) % self.sync_every == 0 and self.step >= max(offset, 1):
                self._start(fragment)
                if self.fragment_delay == 0:
                    self._finish(fragment)

    def _start(self, fragment: int) -> None:
        """Launch the all-reduce of this fragment's pseudo-gradient ``global - local`` (SUM; divided
        by the world size on arrival: gloo has no AVG)."""
        indices = self.fragments[fragment]
        with torch.no_grad():
            pseudo = [self.global_params[i] - self._local[i].detach().to("cpu", torch.float32) for i in indices]
            dtype = self.communication_dtype or torch.float32
            flat = torch.cat([p.reshape(-1) for p in pseudo]).to(self.device, dtype)
        self.bytes_sent += flat.numel() * flat.element_size()
        work = _collective(
            f"DiLoCo: the all-reduce of fragment {fragment} at inner step {self.step}",
            lambda: dist.all_reduce(flat, dist.ReduceOp.SUM, self.group, async_op=self.fragment_delay > 0),
        )
        snapshot = [self._local[i].detach().clone() for i in indices] if self.fragment_delay else []
        self._pending[fragment] = (self.step + self.fragment_delay, work, flat, snapshot)

    def _finish(self, fragment: int) -> None:
        """The outer step on this fragment's global weights; the replica continues from them (plus
        what it learned while the all-reduce was in flight)."""
        _, work, flat, snapshot = self._pending.pop(fragment)
        if work is not None:
            _collective(f"DiLoCo: waiting for fragment {fragment}'s all-reduce", work.wait)
        indices = self.fragments[fragment]
        averaged = flat.to("cpu", torch.float32) / self.world
        with torch.no_grad():
            offset = 0
            for i in indices:
                g = self.global_params[i]
                g.grad = averaged[offset : offset + g.numel()].view_as(g).clone()
                offset += g.numel()
            fragment_params = {id(self.global_params[i]) for i in indices}
            self._outer_step(fragment_params)
            for k, i in enumerate(indices):
                local = self._local[i]
                progress = local.detach() - snapshot[k] if snapshot else None
                local.copy_(self.global_params[i].to(local.device, local.dtype))
                if progress is not None:
                    local.add_(progress)
            if fragment == len(self.fragments) - 1 or len(self.fragments) == 1:
                self._average_buffers()

    def _outer_step(self, params: set[int]) -> None:
        """Step the outer optimizer on these global tensors only (the others keep ``grad=None``, so
        every torch optimizer skips them and their state)."""
        for g in self.global_params:
            if id(g) not in params:
                g.grad = None
        self.outer.step()
        for g in self.global_params:
            g.grad = None

    def _average_buffers(self) -> None:
        persistent = set(self.model.state_dict())  # not masks or caches a module rebuilds itself
        floating = [b for name, b in self.model.named_buffers() if name in persistent and b.is_floating_point()]
        if not floating:
            return
        flat = torch.cat([b.detach().reshape(-1).to(self.device, torch.float32) for b in floating])
        self.bytes_sent += flat.numel() * flat.element_size()
        _collective("DiLoCo: averaging the buffers", lambda: dist.all_reduce(flat, dist.ReduceOp.SUM, self.group))
        flat /= self.world
        offset = 0
        with torch.no_grad():
            for b in floating:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()

    def global_state(self) -> dict[str, Tensor]:
        """The model's state dict with every parameter replaced by the global (merged) weights, in
        the parameter's dtype and device; buffers as this replica holds them."""
        state = dict(self.model.state_dict())
        for (name, param), global_ in zip(self.model.named_parameters(), self.global_params, strict=True):
            state[name] = global_.to(param.device, param.dtype)
        return state

    def flush(self) -> None:
        """Finish every all-reduce in flight (before saving, or at the end of training)."""
        for fragment in sorted(self._pending):
            self._finish(fragment)

    def state_dict(self) -> dict[str, Any]:
        """The global weights, the outer optimizer's state, the position in the round, and the
        all-reduces in flight (waited for, not yet applied: a resume applies them at the same step)."""
        pending = {}
        for fragment, (due, work, flat, snapshot) in self._pending.items():
            if work is not None:
                _collective(f"DiLoCo: waiting for fragment {fragment}'s all-reduce", work.wait)
                self._pending[fragment] = (due, None, flat, snapshot)
            pending[fragment] = {
                "due": due,
                "reduced": flat.to("cpu", copy=True),
                "snapshot": [t.cpu() for t in snapshot],
            }
        return {
            "global": [g.clone() for g in self.global_params],
            "outer": self.outer.state_dict(),
            "step": self.step,
            "bytes_sent": self.bytes_sent,
            "pending": pending,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = list(state["global"])
        if len(saved) != len(self.global_params) or any(
            s.shape != g.shape for s, g in zip(saved, self.global_params, strict=True)
        ):
            raise ValueError("DiLoCo.load_state_dict: the saved global weights do not match this model's parameters")
        with torch.no_grad():
            for g, s in zip(self.global_params, saved, strict=True):
                g.copy_(s)
        self.outer.load_state_dict(state["outer"])
        self.step, self.bytes_sent = int(state["step"]), int(state.get("bytes_sent", 0))
        self._pending = {
            int(fragment): (
                int(p["due"]),
                None,
                p["reduced"].to(self.device),
                [
                    t.to(self._local[i].device)
                    for t, i in zip(p["snapshot"], self.fragments[int(fragment)], strict=True)
                ],
            )
            for fragment, p in dict(state.get("pending") or {}).items()
        }

    def close(self) -> None:
        """Stop syncing (removes the hook on the inner optimizer)."""
        self.flush()
        self._hook.remove()


class Sparta:
    """SPARTA: after every ``every`` inner steps, average a random ``fraction`` of the parameters'
    elements across the replicas, in place; the indices come from a generator seeded alike on
    every replica, so all of them pick the same ones.

    Args:
        model: this replica's model.
        inner_optimizer: the optimizer the training loop steps.
        fraction: the share of each parameter's elements averaged at a time, in (0, 1]
            (``1.0``: every element, i.e. averaging after every step).
        every: inner steps between two exchanges.
        seed: the shared generator's seed.
        process_group: the replicas' group (default: the world).

    Example::

        sparta = Sparta(model, inner_optimizer, fraction=0.005)
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        *,
        fraction: float,
        every: int = 1,
        seed: int = 0,
        process_group: Any = None,
    ):
        _check_fraction(fraction)
        check_int(every, "every", minimum=1)
        check_int(seed, "seed")
        self.rank, self.world = _group_size(process_group, "Sparta")
        self.model, self.group = model, process_group
        self.fraction, self.every = float(fraction), every
        self.device = collective_device(process_group)
        _check_same_model(model, process_group, "Sparta")
        self.params = [p for p in model.parameters()]
        _broadcast_from_rank0(self.params, process_group, "Sparta")
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = [max(1, math.ceil(self.fraction * p.numel())) for p in self.params]
        self.step = 0
        self.bytes_sent = 0
        self._hook = _hooked(inner_optimizer, self._after_inner_step)

    def indices(self) -> list[Tensor | None]:
        """The elements of each parameter averaged next (``None``: all of them); draws from the
        shared generator, so every replica must call it at the same steps."""
        if self.fraction >= 1.0:
            return [None] * len(self.params)
        return [
            torch.randint(p.numel(), (k,), generator=self.generator)
            for p, k in zip(self.params, self.counts, strict=True)
        ]

    def _after_inner_step(self) -> None:
        self.step += 1
        if self.step % self.every:
            return
        chosen = self.indices()
        with torch.no_grad():
            values = [
                (p.detach().reshape(-1) if idx is None else p.detach().reshape(-1)[idx.to(p.device)])
                for p, idx in zip(self.params, chosen, strict=True)
            ]
            flat = torch.cat([v.to(self.device, torch.float32) for v in values])
            self.bytes_sent += flat.numel() * flat.element_size()
            _collective(
                f"Sparta: the all-reduce at inner step {self.step}",
                lambda: dist.all_reduce(flat, dist.ReduceOp.SUM, self.group),
            )
            flat /= self.world
            offset = 0
            for p, idx, v in zip(self.params, chosen, values, strict=True):
                averaged = flat[offset : offset + v.numel()].to(p.device, p.dtype)
                offset += v.numel()
                if idx is None:
                    p.copy_(averaged.view_as(p))
                else:
                    p.view(-1)[idx.to(p.device)] = averaged

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "step": self.step, "bytes_sent": self.bytes_sent}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.step, self.bytes_sent = int(state["step"]), int(state.get("bytes_sent", 0))

    def close(self) -> None:
        self._hook.remove()


def _check_diloco(sync_every: int, fragments: int, fragment_delay: int, communication_dtype: Any) -> None:
    check_int(sync_every, "sync_every", minimum=1)
    check_int(fragments, "fragments", minimum=1)
    check_int(fragment_delay, "fragment_delay")
    if sync_every % fragments:
        raise ValueError(f"sync_every={sync_every} must be a multiple of fragments={fragments}")
    if fragment_delay >= sync_every // fragments and fragments > 1 or fragment_delay >= sync_every:
        raise ValueError(
            f"fragment_delay={fragment_delay} must be smaller than sync_every / fragments = {sync_every // fragments}: "
            "a fragment's all-reduce must land before the next fragment's starts"
        )
    if communication_dtype is not None and not (
        isinstance(communication_dtype, torch.dtype) and communication_dtype.is_floating_point
    ):
        raise ValueError(f"communication_dtype must be a floating dtype, got {communication_dtype!r}")


def _check_fraction(fraction: Any) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")


@dataclass(frozen=True)
class DiLoCoConfig:
    """DiLoCo (and optionally SPARTA) as a framework adapter takes it: checked on construction,
    started on a model and its optimizer once the processes exist."""

    sync_every: int = 50
    """Inner steps between two syncs of each fragment (DiLoCo's H)."""
    outer_optimizer: OuterFactory | None = None
    """A factory called with the global weights' tensors (default: :data:`DEFAULT_OUTER`)."""
    fragments: int = 1
    """Streaming DiLoCo's fragments (1: plain DiLoCo)."""
    fragment_delay: int = 0
    """Inner steps a fragment's all-reduce overlaps with training."""
    communication_dtype: torch.dtype | None = None
    """The pseudo-gradients' dtype on the wire (``torch.bfloat16`` halves the bytes)."""
    sparta_fraction: float | None = None
    """SPARTA's share of the elements averaged after every step (``None``: no SPARTA)."""

    def __post_init__(self) -> None:
        _check_diloco(self.sync_every, self.fragments, self.fragment_delay, self.communication_dtype)
        if self.sparta_fraction is not None:
            _check_fraction(self.sparta_fraction)

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer, process_group: Any = None) -> ReplicaMerging:
        sparta = None
        if self.sparta_fraction is not None:
            sparta = Sparta(model, optimizer, fraction=self.sparta_fraction, process_group=process_group)
        diloco = DiLoCo(
            model, optimizer, sync_every=self.sync_every, outer_optimizer=self.outer_optimizer,
            fragments=self.fragments, fragment_delay=self.fragment_delay, process_group=process_group,
            communication_dtype=self.communication_dtype,
        )  # fmt: skip
        return ReplicaMerging(diloco, sparta)


@dataclass
class ReplicaMerging:
    """A started :class:`DiLoCoConfig`: DiLoCo and SPARTA hooked on one optimizer."""

    diloco: DiLoCo
    sparta: Sparta | None = None

    @property
    def bytes_sent(self) -> int:
        return self.diloco.bytes_sent + (self.sparta.bytes_sent if self.sparta is not None else 0)

    def global_state(self) -> dict[str, Tensor]:
        return self.diloco.global_state()

    def state_dict(self) -> dict[str, Any]:
        return {"diloco": self.diloco.state_dict(), "sparta": self.sparta.state_dict() if self.sparta else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.diloco.load_state_dict(state["diloco"])
        if self.sparta is not None and state.get("sparta") is not None:
            self.sparta.load_state_dict(state["sparta"])

    def close(self) -> None:
        self.diloco.close()
        if self.sparta is not None:
            self.sparta.close()


def _split(parameters: list[Tensor], fragments: int) -> list[list[int]]:
    """Parameter indices in ``fragments`` consecutive groups of about equal element counts."""
    if fragments > len(parameters):
        raise ValueError(f"fragments={fragments} is more than the model's {len(parameters)} parameter tensors")
    total = sum(p.numel() for p in parameters)
    groups: list[list[int]] = [[] for _ in range(fragments)]
    seen, previous = 0, 0
    for i, p in enumerate(parameters):
        target = min(fragments - 1, seen * fragments // max(total, 1), previous + 1)  # never skip a fragment
        target = max(target, fragments - (len(parameters) - i))  # leave a tensor for every later fragment
        groups[target].append(i)
        seen, previous = seen + p.numel(), target
    return groups
