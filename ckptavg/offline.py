"""Merging checkpoints that were saved separately (no window, no training loop)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .kernels import stream_elementwise, stream_merge
from .layout import (
    Layout,
    dtype_from_code,
    is_averaged,
    state_tensors,
)
from .methods import DEFAULT_ALPHA, MergeSpec, Method, coefficients
from .methods.elementwise import check_elementwise, elementwise_names, is_elementwise
from .sharding import Placement, assemble, replicated_placements
from .storage import DiskStore, rank_dirpaths

CheckpointSource = nn.Module | Mapping[str, Tensor] | str | os.PathLike


class _SafetensorsFile(Mapping[str, Tensor]):
    """The tensors of a safetensors file, each read only when asked for. The file is mapped only
    while one tensor is read: kept mapped, every page read so far would stay resident, and merging
    N large files would hold N models in memory."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        with safe_open(str(path), framework="pt", device="cpu") as f:
            self.metadata: dict[str, str] = dict(f.metadata() or {})
            self._keys = list(f.keys())
            self._specs = {
                name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in self._keys
            }

    def __getitem__(self, name: str) -> Tensor:
        from safetensors import safe_open

        if name not in self._specs:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """A tensor's dtype and shape from the header, without reading its data."""
        code, shape = self._specs[name]
        try:
            return dtype_from_code(code), shape
        except ValueError as err:
            raise ValueError(f"{self.path}: tensor {name!r}: {err}") from None


class ShardedFolder(Mapping[str, Tensor]):
    """The tensors of a sharded Hugging Face folder, each read from its shard when asked for;
    the index is checked against the shards' headers when it is opened."""

    def __init__(self, folder: Path, weight_map: Mapping[str, str]):
        self._files = {}
        for name in sorted(set(weight_map.values())):
            try:
                self._files[name] = load_state_file(folder / name)
            except FileNotFoundError:
                raise ValueError(f"{folder / HF_INDEX} names the shard {name}, which does not exist") from None
        self._map = dict(weight_map)
        for tensor, shard in self._map.items():
            if tensor not in self._files[shard]:
                raise ValueError(f"{folder / HF_INDEX} maps tensor {tensor!r} to {shard}, which does not hold it")
        for shard, reader in self._files.items():
            unlisted = sorted(set(reader) - {t for t, s in self._map.items() if s == shard})
            if unlisted:
                raise ValueError(f"{folder / shard} holds tensors its index {HF_INDEX} does not list: {unlisted[:5]}")

    def __getitem__(self, name: str) -> Tensor:
        return self._files[self._map[name]][name]

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._files[self._map[name]].spec(name)  # type: ignore[attr-defined]  # shards are safetensors files

    @property
    def metadata(self) -> dict[str, str]:
        return next(iter(self._files.values())).metadata  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)


HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


def open_folder(path: Path) -> tuple[Mapping[str, Tensor], dict[str, str] | None]:
    """A Hugging Face folder's tensors (read lazily) and, when it is sharded, its weight map."""
    if (path / HF_INDEX).is_file():
        try:
            weight_map = json.loads((path / HF_INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path / HF_INDEX}: cannot read its 'weight_map': {err!r}") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and "/" not in v and v.endswith(".safetensors") for v in weight_map.values()
        ):
            raise ValueError(
                f"{path / HF_INDEX}: 'weight_map' must map tensor names to .safetensors files in the folder"
            )
        return ShardedFolder(path, weight_map), dict(weight_map)
    if (path / HF_SINGLE).is_file():
        return load_state_file(path / HF_SINGLE), None
    raise ValueError(f"{path} is a folder with no {HF_SINGLE}, {HF_INDEX} or ckptavg window manifest")


STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "ema", "model_ema", "state_dict_ema")
"""Where training scripts usually keep the weights inside a saved dict, most common first."""


def load_state_file(path: str | os.PathLike[str], *, key: str | None = None) -> Mapping[str, Tensor]:
    """A state dict from a file, never unpickling code: safetensors (read lazily), a torch file
    (``.pt``, ``.pth``, ``.bin``, Lightning ``.ckpt``) loaded with ``weights_only=True``, or a
    Hugging Face folder (single or sharded safetensors, read lazily).

    Args:
        path: the file or folder.
        key: where the state dict sits inside a torch file that holds more (``"model"`` in
            ``torch.save({"model": ..., "optimizer": ..., "epoch": 3})``; dotted for nesting,
            ``"model.ema"``). By default the file itself when it maps names to tensors, else the
            first entry among :data:`STATE_DICT_KEYS` that does; anything else is refused with the
            file's keys listed, never read as an empty state dict.
    """
    path = Path(path)
    if path.is_dir() or path.name == HF_INDEX:
        return open_folder(path if path.is_dir() else path.parent)[0]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            if key is not None:
                raise ValueError(f"{path}: key={key!r} applies to torch files; a safetensors file is one state dict")
            return _SafetensorsFile(path)
    except ValueError:
        raise
    except Exception as err:  # safetensors raises a variety of types for bad files
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    return find_state_dict(read_torch_file(path), path, key)[1]


def read_torch_file(path: Path, *, mmap: bool = True) -> Any:
    """Everything a torch file holds, loaded with ``weights_only=True`` (memory-mapped unless the
    tensors outlive the call: a file rewritten under a mapping changes or faults them)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises a variety of types for bad files
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err


def find_state_dict(
    obj: Any, where: str | os.PathLike[str], key: str | None = None
) -> tuple[str | None, Mapping[str, Tensor]]:
    """The mapping of names to tensors inside a loaded checkpoint ``obj`` and the key it was found
    under (``None``: ``obj`` itself); see :func:`load_state_file` for the rule."""
    if key is not None:
        found = obj
        for part in key.split("."):
            if not isinstance(found, Mapping) or part not in found:
                keys = sorted(map(str, found)) if isinstance(found, Mapping) else type(found).__name__
                raise ValueError(f"{where}: key {key!r}: no entry {part!r} (found {keys})")
            found = found[part]
        _check_tensors(found, where, f"entry {key!r}")
        return key, found
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} holds a {type(obj).__name__}, not a state dict")
    if _all_tensors(obj):
        return None, obj
    for candidate in STATE_DICT_KEYS:
        if _all_tensors(obj.get(candidate)):
            return candidate, obj[candidate]
    raise ValueError(
        f"{where} holds no state dict: its entries are {sorted(map(str, obj))}, none a mapping of names to tensors. "
        "Name the entry with key= (--key on the command line), dotted for nesting"
    )


def _all_tensors(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _check_tensors(obj: Any, where: str | os.PathLike[str], what: str) -> None:
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{where}: {what} is {'empty' if isinstance(obj, Mapping) else 'a ' + type(obj).__name__}, not a state dict"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{where}: {what} is not a state dict: {bad[:5]} are not tensors")


def _describe(source: CheckpointSource, index: int) -> str:
    return f"checkpoint {source}" if isinstance(source, (str, os.PathLike)) else f"state dict #{index}"


@torch.no_grad()
def merge_state_dicts(
    state_dicts: Sequence[CheckpointSource],
    method: Method | None = None,
    *,
    weights: Method | None = None,
    base: CheckpointSource | None = None,
    alpha: float = DEFAULT_ALPHA,
    **options: Any,
) -> dict[str, Tensor]:
    """Merge separately saved checkpoints with the same kernels as the window.

    Each item (and ``base``) is a state dict, a model, or a file path (safetensors, or a
    torch/Lightning checkpoint loaded with ``weights_only=True``). ``method`` is:

    - ``None`` or a coefficient method's name (``"sma"``, ``"ema"``, ...; the checkpoints count as
      evenly spaced, oldest first) with its ``options``, or one number per checkpoint (scaled to sum
      to 1; also accepted as ``weights=``). Floats are accumulated in fp32 (fp64 in fp64) and cast
      back once; integer and bool tensors come from the newest checkpoint with a non-zero weight.
    - an element-wise method for models fine-tuned from one ``base`` (``"task_arithmetic"``,
      ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"breadcrumbs"``, ``"slerp"``,
      ``"karcher"``, ``"model_stock"``; :mod:`ckptavg.methods.elementwise`), with ``weights`` one
      per model (default 1) and its options (``density=0.5``; per tensor as a list of
      ``{"filter": ..., "value": ...}``). Integer and bool tensors come from the base.

    Tensors are paired by name; any difference in names, shapes or dtypes raises ``ValueError``
    naming the key and the checkpoint, before anything is computed.

    >>> import torch
    >>> a = {"w": torch.zeros(2), "n": torch.tensor(1)}
    >>> b = {"n": torch.tensor(5), "w": torch.ones(2)}
    >>> merge_state_dicts([a, b], weights=[1, 3])
    {'w': tensor([0.7500, 0.7500]), 'n': tensor(5)}
    >>> merge_state_dicts([b], "task_arithmetic", base=a, weights=[0.5])
    {'w': tensor([0.5000, 0.5000]), 'n': tensor(1)}
    """
    if isinstance(state_dicts, (str, os.PathLike, Mapping)):
        raise TypeError("merge_state_dicts takes a sequence of checkpoints")
    if isinstance(method, MergeSpec):
        spec: MergeSpec = method
        method, options = spec.method, {**spec.options, **options}
    if method is not None and weights is not None and not is_elementwise(method):
        raise ValueError("give a method or weights, not both (a weight list is itself the method)")
    sources = list(state_dicts)
    if is_elementwise(method):
        assert isinstance(method, str)
        return _merge_elementwise(sources, method, weights, base, options)
    if base is not None:
        raise ValueError(f"base= is for element-wise methods ({elementwise_names()}); {method or 'sma'!r} takes none")
    chosen = method if method is not None else weights
    coeffs = coefficients("sma" if chosen is None else chosen, len(sources), alpha, **options)
    dicts = _load_all(sources)
    layout = _common_layout(sources, dicts)
    merged = {entry.name: torch.empty(entry.shape, dtype=entry.dtype) for entry in layout}
    for entry, lo, hi, values in stream_merge(layout, dicts, coeffs):
        merged[entry.name].view(-1)[lo:hi].copy_(values)
    return merged


def _load_all(sources: Sequence[CheckpointSource]) -> list[dict[str, Tensor]]:
    """Every source's tensors (files read lazily), found inside ``{"model": ..., ...}`` dicts too."""
    loaded = [load_state_file(s) if isinstance(s, (str, os.PathLike)) else s for s in sources]
    dicts = [state_tensors(d) for d in loaded]
    for index, (source, tensors) in enumerate(zip(sources, dicts, strict=True)):
        if not tensors and isinstance(source, Mapping):  # {"model": ..., "optimizer": ..., "epoch": 3}
            dicts[index] = dict(find_state_dict(source, _describe(source, index))[1])
    return dicts


def _common_layout(sources: Sequence[CheckpointSource], dicts: Sequence[Mapping[str, Tensor]]) -> Layout:
    layout = Layout.from_tensors(dicts[0])
    for index, (source, tensors) in enumerate(zip(sources, dicts, strict=True)):
        layout.check(tensors, what=_describe(source, index))
    return layout


def _merge_elementwise(
    sources: list[CheckpointSource],
    method: str,
    weights: Any,
    base: CheckpointSource | None,
    options: dict[str, Any],
) -> dict[str, Tensor]:
    check_elementwise(method, options, len(sources), base is not None)
    per_model = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    if len(per_model) != len(sources):
        raise ValueError(f"weights: expected {len(sources)} (one per model), got {len(per_model)}")
    everything = ([base] if base is not None else []) + sources
    dicts = _load_all(everything)
    layout = _common_layout(everything, dicts)
    base_tensors, inputs = (dicts[0], dicts[1:]) if base is not None else (None, dicts)
    return {
        entry.name: tensor if is_averaged(entry.dtype) else tensor.clone()  # never the input's own storage
        for entry, tensor in stream_elementwise(layout, base_tensors, inputs, method, per_model, options)
    }


def consolidate(
    dirpath: str | os.PathLike[str],
    method: Method = "sma",
    alpha: float = DEFAULT_ALPHA,
    *,
    before: int | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """The full merged state dict of a disk window written by a multi-process run, in one process.

    ``dirpath`` is the folder every rank was given (holding rank 0's index ``manifest.json`` and
    the folders ``rank0``, ``rank1``, ...) or a single-process window. Each rank's files are merged with the same coefficient vector over the
    steps that every rank holds (a crash can leave one rank a snapshot ahead), and the pieces are
    put in place: FSDP2 shards at their offsets, spread slices at their ranges, replicas once.
    Peak memory: the full result, one rank's merge, and a byte per element (the coverage check).

    Raises ``FileNotFoundError`` naming a missing rank folder or manifest, and ``ValueError``
    naming the folder when the ranks disagree on the world size or no step is held by all of them.
    """
    from .window import CheckpointWindow

    folders, manifests, common = _consolidation(dirpath, before)
    chosen = dict(zip(common, coefficients(method, common, alpha, **options), strict=True))

    def rank_merges() -> Iterator[tuple[dict[str, Tensor], Mapping[str, Placement]]]:
        for folder, manifest in zip(folders, manifests, strict=True):  # one rank's merge in memory at a time
            with CheckpointWindow.open(folder, readonly=True) as window:
                merged = window.merge([chosen.get(step, 0.0) for step in window.steps])
            sharding = manifest.get("sharding")
            yield merged, sharding["placements"] if sharding else replicated_placements(merged)

    return assemble(rank_merges(), where=str(dirpath))


def consolidated_steps(dirpath: str | os.PathLike[str], *, before: int | None = None) -> list[int]:
    """The steps :func:`consolidate` merges: those every rank's folder holds (``< before``)."""
    return _consolidation(dirpath, before)[2]


def _consolidation(
    dirpath: str | os.PathLike[str], before: int | None
) -> tuple[list[Path], list[dict[str, Any]], list[int]]:
    """Every rank's folder and manifest, and the steps all of them hold; refused, naming the
    folder, when the ranks are not one run's or share no step."""
    folders = rank_dirpaths(dirpath)
    manifests = [DiskStore.read_manifest(folder) for folder in folders]
    worlds = {int((m.get("sharding") or {}).get("world_size", 1)) for m in manifests}
    if len(worlds) != 1 or worlds != {len(folders)}:
        raise ValueError(
            f"{dirpath}: found rank folders {[f.name for f in folders]} recording world sizes {sorted(worlds)}; "
            "a consolidated merge needs the folder of every rank of one run"
        )
    held = [[int(r["step"]) for r in m["snapshots"]] for m in manifests]
    common = sorted(set.intersection(*(set(h) for h in held)))
    if before is not None:
        common = [s for s in common if s < before]
    if not common:
        raise ValueError(f"{dirpath}: no snapshot step is held by every rank (held: {held})")
    return folders, manifests, common


def load_merged_weights(checkpoint: str | os.PathLike[str], *, averager: str | None = None) -> dict[str, Tensor]:
    """The merged weights of a Lightning checkpoint saved by a run with a ``CheckpointAverager``:
    the merge of the window it recorded, which is what ``merged/<metric>`` measured when it was
    saved (so the "best" checkpoint of ``ModelCheckpoint(monitor="merged/val_loss")`` gives the
    weights that earned its score). A state dict, loadable into the LightningModule.

    Args:
        checkpoint: a Lightning ``.ckpt`` file, read with ``weights_only=True``.
        averager: a part of the averager's state key, when the run had several averagers.

    A checkpoint saved before the first snapshot gives its own weights (what the averager would
    have left in place). A disk window is read from its folder, which must still hold the
    snapshots the checkpoint lists (``ValueError`` naming the missing steps otherwise).

    Example::

        model.load_state_dict(ckptavg.load_merged_weights(checkpoint_callback.best_model_path))
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = read_torch_file(path, mmap=False)  # the returned weights outlive the call
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict' entry")
    found = ckpt.get("callbacks")
    callbacks: Mapping[Any, Any] = found if isinstance(found, Mapping) else {}
    states = {str(k): v for k, v in callbacks.items() if str(k).startswith("CheckpointAverager")}
    if averager is not None:
        states = {k: v for k, v in states.items() if averager in k}
    if not states:
        raise ValueError(
            f"{path} holds no CheckpointAverager state{'' if averager is None else f' matching {averager!r}'} (callbacks: {sorted(map(str, callbacks))})"
        )
    if len(states) > 1:
        raise ValueError(
            f"{path} holds the states of {len(states)} CheckpointAveragers: pass averager= with a part of one of {sorted(states)}"
        )
    (state,) = states.values()
    weights = dict(ckpt["state_dict"])
    window = state.get("window") if isinstance(state, Mapping) else None
    if window is None:
        return weights
    method, alpha, options = (
        state.get("merge", "sma"),
        state.get("alpha", DEFAULT_ALPHA),
        dict(state.get("merge_options") or {}),
    )
    if state.get("coefficients") is not None:  # what the run applied (since 0.2): options need not be rebuilt
        coefficients_ = state["coefficients"]
        if not isinstance(coefficients_, (list, tuple)) or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in coefficients_
        ):
            raise ValueError(
                f"{path}: the CheckpointAverager state's field 'coefficients' must be a list of finite numbers"
            )
        method, options = [float(c) for c in coefficients_], {}
    weights.update(_merge_window_state(window, method, alpha, options, where=path))
    return weights


def _merge_window_state(
    state: Mapping[str, Any], method: Method, alpha: float, options: dict[str, Any], where: Path
) -> dict[str, Tensor]:
    """The merge of a window recorded by a ``CheckpointAverager`` state (see its ``state_dict``)."""
    from .window import CheckpointWindow

    if "ranks" in state:  # a multi-process run: every rank's part, gathered on rank 0
        parts = list(state["ranks"])
        kinds = {(p.get("sharding") or {}).get("kind") for p in parts}
        if any(p.get("storage") != "cpu" for p in parts) or kinds - {"spread", "replicated"}:
            raise ValueError(
                f"{where} records a multi-process {parts[0].get('storage')} window; merge its folder with ckptavg.consolidate"
            )
        state = CheckpointWindow.combine_states(parts) if kinds == {"spread"} else parts[0]
    steps = [int(s) for s in state.get("steps", [])]
    if not steps:
        return {}
    if state.get("storage") == "cpu":
        window = CheckpointWindow(window=max(len(steps), 1), storage="cpu")
        window.load_state_dict(state)
        return window.merge(method, alpha, **options)
    chosen = dict(zip(steps, coefficients(method, steps, alpha, **options), strict=True))
    with CheckpointWindow.open(state["dirpath"], readonly=True) as window:
        missing = sorted(set(steps) - set(window.steps))
        if missing:
            raise ValueError(
                f"{where} records a disk window of steps {steps}; {state['dirpath']} no longer holds steps {missing} "
                "(evicted since). Its merged weights can no longer be rebuilt"
            )
        return window.merge([chosen.get(step, 0.0) for step in window.steps])
