"""``ckptavg``: merge, export, inspect and verify checkpoints from the command line (no Lightning needed).

    ckptavg merge run/ckpts/*.safetensors --last 8 --method decay --option shape=1-sqrt -o merged.safetensors
    ckptavg merge a.ckpt b.ckpt --weights 0.3,0.7 -o merged.safetensors
    ckptavg merge "out/checkpoint-*" --last 4 -o out/merged          # Hugging Face folders: a folder output keeps the sharding and the model's files
    ckptavg merge run.pt other.pt --key model -o merged.safetensors  # torch.save({"model": ..., "optimizer": ...}) files
    ckptavg merge lightning_logs/version_0/ckptavg/window -o merged.safetensors   # a disk window (any number of ranks)
    ckptavg export lightning_logs/version_0/checkpoints/best.ckpt -o best-merged.safetensors   # the merge a checkpoint measured
    ckptavg inspect merged.safetensors --json
    ckptavg verify out/merged                                       # exit status 1 names every damaged file

Inputs are merged oldest first: ordered by the training step each names (the last number in its
name, else the step recorded inside), in the order given when some name none; the order used is
printed. The output path decides the output's form: a ``.safetensors`` path is one file, any other
path a folder (a Hugging Face folder when the inputs are). An existing output is replaced only with
``--force``, and never when it is, holds or lies inside an input. Files are read lazily, tensor by
tensor, and written as they are computed, into a temporary name renamed at the end: peak memory is
about the largest tensor times the number of inputs, and a failure leaves nothing half-written.
Torch files are loaded with ``weights_only=True``: nothing is unpickled but tensors.

Exit status: 0 done, 1 damage found (inspect, verify), 2 bad input (the message names the file,
key or argument), 3 an internal error (a bug: please report it).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .files import (
    CorruptSnapshotError,
    atomic_folder,
    atomic_write_bytes,
    human_size,
    safetensors_metadata,
    snapshot_header,
    tensor_bytes,
)
from .kernels import all_finite, stream_elementwise, stream_merge
from .layout import Entry, Layout, dtype_code, is_averaged
from .methods import DEFAULT_ALPHA, coefficients, method_names
from .methods.elementwise import check_elementwise, elementwise_names, is_elementwise
from .offline import (
    HF_INDEX,
    HF_SINGLE,
    consolidate,
    consolidated_steps,
    find_state_dict,
    load_merged_weights,
    load_state_file,
    open_folder,
    read_torch_file,
)
from .storage import MANIFEST, progress_bar, rank_dirpaths

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
MODEL_FILES = re.compile(
    r"^(config\.json|generation_config\.json|[\w.-]*tokenizer[\w.-]*|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.(json|txt)|merges\.txt|spiece\.model|[\w.-]*preprocessor_config\.json|processor_config\.json"
    r"|chat_template\.(json|jinja)|[\w-]+\.py)$"
)
"""The files of a Hugging Face folder a merged model needs beside its weights (configuration,
tokenizer, processor, remote code); training state, other weight formats and the rest stay behind."""


class UsageError(ValueError):
    """Bad input: reported with the file, key or argument, exit status 2."""


# -- inputs --------------------------------------------------------------------------------------


@dataclass
class Source:
    """One input checkpoint: its tensors by name (read lazily), and where they came from."""

    path: Path
    tensors: Mapping[str, Tensor]
    shards: dict[str, str] | None = None  # Hugging Face: tensor name -> shard file name
    recorded_step: int | None = None  # the training step the checkpoint records inside, if any
    key: str | None = None  # where the state dict sat inside a torch file
    contents: Any = None  # everything a torch file holds (read once: inspect looks for a window in it)

    @property
    def step(self) -> int | None:
        """The training step this input stands for: the last number in its name, else the one recorded inside."""
        numbers = re.findall(
            r"\d+", self.path.name.removesuffix(self.path.suffix) if self.path.is_file() else self.path.name
        )
        return int(numbers[-1]) if numbers else self.recorded_step


def is_window(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def _trainer_step(folder: Path) -> int | None:
    """The step a Hugging Face Trainer checkpoint folder records (``trainer_state.json``)."""
    try:
        step = json.loads((folder / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _recorded_step(value: Any) -> int | None:
    for name in ("global_step", "step"):
        step = value.get(name) if isinstance(value, Mapping) else None
        if isinstance(step, str) and step.isdigit():
            step = int(step)
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    return None


def open_source(path: Path, key: str | None = None) -> Source:
    if path.is_file() and path.name == HF_INDEX:
        path = path.parent  # the index stands for its folder
    if path.is_dir():
        tensors, shards = open_folder(path)
        return Source(path, tensors, shards=shards, recorded_step=_trainer_step(path))
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        tensors = load_state_file(path, key=key)
        return Source(path, tensors, recorded_step=_recorded_step(getattr(tensors, "metadata", None)))
    obj = read_torch_file(path)
    found, tensors = find_state_dict(obj, path, key)
    return Source(path, tensors, recorded_step=_recorded_step(obj), key=found, contents=obj)


def _natural(path: str) -> list[Any]:
    """``checkpoint-500`` before ``checkpoint-1500``: numbers compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def expand(patterns: Sequence[str]) -> list[Path]:
    """Paths in the order given; a pattern that is not an existing path is a glob (its matches in
    natural order)."""
    paths: list[Path] = []
    for pattern in patterns:
        if Path(pattern).exists():
            paths.append(Path(pattern))
            continue
        matches = sorted(glob.glob(pattern), key=_natural)
        if not matches:
            raise UsageError(f"{pattern}: no such file, folder or matching path")
        paths.extend(Path(m) for m in matches)
    return paths


def oldest_first(sources: list[Source]) -> tuple[list[Source], list[int] | None]:
    """The inputs ordered by the step each stands for, when every one names a step (ties keep the
    order given); else in the order given. Returns the steps too (``None`` when some have none)."""
    steps = [s.step for s in sources]
    if any(step is None for step in steps):
        return sources, None
    order = sorted(range(len(sources)), key=lambda i: steps[i])  # type: ignore[arg-type,return-value]
    return [sources[i] for i in order], [int(steps[i]) for i in order]  # type: ignore[arg-type]


def describe(tensors: Mapping[str, Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Names, dtypes and shapes, without reading any data (safetensors headers; torch files are
    memory-mapped)."""
    spec = getattr(tensors, "spec", None)
    return {
        name: spec(name) if spec is not None else (tensors[name].dtype, tuple(tensors[name].shape)) for name in tensors
    }


# -- outputs -------------------------------------------------------------------------------------


def check_output(output: Path, inputs: Sequence[Path], force: bool, *, folder: bool) -> None:
    """Before anything is read or written: the output is no input, holds none and lies in none,
    and an existing one is replaced only with ``--force`` (and only by the same kind)."""
    target = output.resolve()
    for path in inputs:
        source = path.resolve()
        if target == source or source in target.parents:
            raise UsageError(
                f"-o {output}: the output would be written {'over' if target == source else 'inside'} the input {path}"
            )
        if target in source.parents:
            raise UsageError(f"-o {output}: the output folder holds the input {path}; choose another output")
    if output.is_symlink() or output.exists():
        if not force:
            raise UsageError(f"-o {output} already exists: give --force to replace it, or choose another output")
        if folder != output.is_dir():
            raise UsageError(
                f"-o {output} is {'a folder' if output.is_dir() else 'a file'}; --force replaces it only with the same kind"
            )


# -- merging -------------------------------------------------------------------------------------


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {pair!r}: expected KEY=VALUE, e.g. --option shape=1-sqrt")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text  # a plain string: shape=1-sqrt
    return options


def file_order(layout: Layout) -> list[Entry]:
    """The entries in the order their bytes lie in a file written by :func:`write_safetensors`:
    dtype groups, then offsets."""
    groups = list(layout.group_numel)
    return sorted(layout, key=lambda e: (groups.index(e.dtype), e.offset))


def merged_chunks(
    layout: Layout, sources: Sequence[Mapping[str, Tensor]], weights: Sequence[float], progress: Any
) -> Iterator[memoryview]:
    """The merged tensors' bytes in file order, computed one block at a time with the window's
    kernel (:func:`ckptavg.kernels.weighted_sum_`: fp32 accumulation, fp64 for fp64); integer
    tensors from the newest input with a non-zero weight, as in the window."""
    for entry, lo, hi, values in stream_merge(file_order(layout), sources, weights):
        if is_averaged(entry.dtype) and not all_finite(values):
            raise UsageError(
                f"tensor {entry.name!r}: the merge is not finite (NaN or Inf in an input, or weights that overflow)"
            )
        yield tensor_bytes(values.to(entry.dtype).contiguous())
        progress((hi - lo) * entry.dtype.itemsize)


def tensor_chunks(layout: Layout, tensors: Mapping[str, Tensor]) -> Iterator[memoryview]:
    """The bytes of tensors already in memory (a merge done elsewhere), in file order."""
    for entry in file_order(layout):
        yield tensor_bytes(tensors[entry.name].reshape(-1).contiguous())


def write_safetensors(path: Path, layout: Layout, chunks: Iterator[memoryview], metadata: dict[str, str]) -> None:
    """A safetensors file written as ``chunks`` arrive (the header first: it only needs the
    layout), atomically: a failure leaves no partial file."""

    def stream() -> Iterator[memoryview | bytes]:
        yield snapshot_header(layout, metadata)
        yield from chunks

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, stream())


def command_merge(args: argparse.Namespace) -> int:
    if args.config:
        if args.inputs or args.base or args.weights or args.option:
            raise UsageError("--config holds the inputs, base, weights and options: give it alone (with -o)")
        return _merge_config(args, Path(args.config))
    if not args.inputs:
        raise UsageError("give the inputs to merge (or --config merge.yml)")
    if is_elementwise(args.method):
        weights = _parse_weights(args.weights)
        return merge_elementwise(
            args, expand(args.inputs), args.base, args.method, weights, parse_options(args.option), None
        )
    if args.base:
        raise UsageError(
            f"--base is for element-wise methods ({', '.join(elementwise_names())}); --method {args.method} takes none"
        )
    paths = expand(args.inputs)
    if args.last is not None and args.last < 1:
        raise UsageError(f"--last must be a positive integer, got {args.last}")
    options = parse_options(args.option)
    weights_arg = _parse_weights(args.weights)
    method: Any = weights_arg if weights_arg is not None else args.method
    output = Path(args.output)
    as_folder = output.suffix != ".safetensors"
    check_output(output, paths, args.force, folder=as_folder)
    windows = [p for p in paths if is_window(p)]
    if windows:
        if len(paths) != 1:
            raise UsageError(
                f"{windows[0]} is a ckptavg window folder: merge it on its own (its snapshots are the inputs)"
            )
        return _merge_window(args, paths[0], method, options, output, as_folder)
    opened, steps = oldest_first([open_source(p, args.key) for p in paths])
    if args.last is not None:
        if args.last > len(opened):
            raise UsageError(f"--last {args.last}: only {len(opened)} inputs were given")
        opened, steps = opened[-args.last :], None if steps is None else steps[-args.last :]
    _say(
        args,
        "inputs, oldest first: "
        + ", ".join(f"{s.path}" + ("" if s.step is None else f" (step {s.step})") for s in opened),
    )
    try:
        weights = coefficients(
            method, steps if steps is not None else list(range(1, len(opened) + 1)), args.alpha, **options
        )
    except ValueError as err:
        if steps is None:
            raise
        raise UsageError(
            f"{err} (the steps were read from the inputs' names, or recorded inside them: {steps})"
        ) from None
    layout = _checked_layout(opened)
    metadata = _metadata(method, weights, [str(s.path) for s in opened], options, steps)
    live = sum(1 for w in weights if w)
    bar = progress_bar(live * layout.nbytes, f"merging {len(opened)} checkpoints", args.quiet)  # the bytes read

    def progress(written: int) -> None:
        bar.update(written * live)

    tensors = [s.tensors for s in opened]
    try:
        if as_folder:
            model_files = next((s for s in opened if s.path.is_dir()), None)  # the oldest Hugging Face input
            atomic_folder(
                output,
                lambda folder: _write_hf_folder(
                    folder, model_files, layout, lambda part: merged_chunks(part, tensors, weights, progress), metadata
                ),
            )
        else:
            write_safetensors(output, layout, merged_chunks(layout, tensors, weights, progress), metadata)
    finally:
        bar.close()
    _say(
        args,
        f"merged {len(opened)} checkpoints ({args.method if weights_arg is None else 'weights'}: {[round(w, 4) for w in weights]}) into {output}",
    )
    return 0


def _merge_window(
    args: argparse.Namespace, window: Path, method: Any, options: dict[str, Any], output: Path, as_folder: bool
) -> int:
    """A window folder's snapshots are the inputs (``--last N``: its newest ``N``)."""
    steps = consolidated_steps(window)
    chosen = steps if args.last is None else steps[-args.last :]
    if args.last is not None and args.last > len(steps):
        raise UsageError(f"--last {args.last}: {window} holds {len(steps)} snapshots (steps {steps})")
    weights = coefficients(method, chosen, args.alpha, **options)
    merged = consolidate(window, [0.0] * (len(steps) - len(chosen)) + list(weights))
    metadata = _metadata(method, weights, [str(window)], options, chosen)
    layout = Layout.from_tensors(merged)
    if as_folder:
        atomic_folder(
            output,
            lambda folder: write_safetensors(folder / HF_SINGLE, layout, tensor_chunks(layout, merged), metadata),
        )
    else:
        write_safetensors(output, layout, tensor_chunks(layout, merged), metadata)
    _say(args, f"merged {len(chosen)} snapshots of {window} (steps {chosen[0]}..{chosen[-1]}) into {output}")
    return 0


def _checked_layout(sources: Sequence[Source]) -> Layout:
    """The first input's tensors; every other input must have the same names, dtypes and shapes
    (checked before anything is computed or written)."""
    reference = describe(sources[0].tensors)
    for source in sources[1:]:
        other = describe(source.tensors)
        missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
        if missing or extra:
            raise UsageError(
                f"{source.path}: tensors differ from {sources[0].path}: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for name, (dtype, shape) in reference.items():
            if other[name] != (dtype, shape):
                raise UsageError(
                    f"{source.path}: tensor {name!r} is {other[name][0]} {list(other[name][1])}, in {sources[0].path} {dtype} {list(shape)}"
                )
    return Layout([(name, dtype, shape) for name, (dtype, shape) in reference.items()])


def _metadata(
    method: Any, weights: Sequence[float], inputs: list[str], options: dict[str, Any], steps: list[int] | None
) -> dict[str, str]:
    metadata = safetensors_metadata(
        "merged",
        method=method if isinstance(method, str) else "weights",
        coefficients=json.dumps(list(weights)),
        inputs=json.dumps(inputs),
        options=json.dumps(options),
    )
    if steps is not None:
        metadata["steps"] = json.dumps(steps)
    return metadata


def _write_hf_folder(
    folder: Path,
    model_files: Source | None,
    layout: Layout,
    chunks: Callable[[Layout], Iterator[memoryview]],
    metadata: dict[str, str],
) -> None:
    """A Hugging Face folder: the sharding of ``model_files`` (one ``model.safetensors`` when it
    has none), each shard written as it is computed, its index, and the files a model needs
    beside its weights (:data:`MODEL_FILES`)."""
    shards = (model_files.shards if model_files is not None else None) or {e.name: HF_SINGLE for e in layout}
    for shard in sorted(set(shards.values())):
        names = [e.name for e in layout if shards[e.name] == shard]
        part = Layout([(n, layout.entries[n].dtype, layout.entries[n].shape) for n in names])
        write_safetensors(folder / shard, part, chunks(part), metadata)
    if len(set(shards.values())) > 1:
        index = {"metadata": {"total_size": layout.nbytes, "ckptavg": metadata}, "weight_map": shards}
        (folder / HF_INDEX).write_text(json.dumps(index, indent=2))
    if model_files is not None and model_files.path.is_dir():
        for item in sorted(model_files.path.iterdir()):
            if item.is_file() and not item.is_symlink() and MODEL_FILES.match(item.name):
                shutil.copy2(item, folder / item.name)


def _parse_weights(text: str | None) -> list[float] | None:
    try:
        return [float(w) for w in text.split(",")] if text else None
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected numbers separated by commas, e.g. --weights 0.2,0.8") from None


def elementwise_chunks(
    layout: Layout,
    base: Mapping[str, Tensor] | None,
    sources: Sequence[Mapping[str, Tensor]],
    method: str,
    weights: Sequence[float],
    options: Mapping[str, Any],
    dtype: torch.dtype | None,
    progress: Any,
) -> Iterator[memoryview]:
    """An element-wise merge's bytes in file order, one tensor at a time (``dtype``: cast floats)."""
    for entry, values in stream_elementwise(file_order(layout), base, sources, method, weights, options):
        if is_averaged(entry.dtype) and not all_finite(values):
            raise UsageError(f"tensor {entry.name!r}: the {method} merge is not finite (NaN or Inf in an input?)")
        if dtype is not None and is_averaged(entry.dtype):
            values = values.to(dtype)
        yield tensor_bytes(values.reshape(-1).contiguous())
        progress(entry.numel * entry.dtype.itemsize)


def merge_elementwise(
    args: argparse.Namespace,
    paths: list[Path],
    base_path: str | None,
    method: str,
    weights: list[float] | None,
    options: dict[str, Any],
    dtype: torch.dtype | None,
) -> int:
    """Models fine-tuned from one base, merged element by element (TIES, DARE, SLERP, ...): inputs in
    the order given; configs and tokenizer files, and the sharding, from the base."""
    per_model = weights if weights is not None else [1.0] * len(paths)
    if len(per_model) != len(paths):
        raise UsageError(f"--weights: expected {len(paths)} (one per input model), got {len(per_model)}")
    try:
        check_elementwise(method, options, len(paths), base_path is not None)
    except ValueError as err:
        raise UsageError(str(err)) from None
    output = Path(args.output)
    as_folder = output.suffix != ".safetensors"
    base = open_source(Path(base_path), args.key) if base_path else None
    check_output(output, paths + ([base.path] if base is not None else []), args.force, folder=as_folder)
    opened = [open_source(p, args.key) for p in paths]
    everything = ([base] if base is not None else []) + opened
    layout = _checked_layout(everything)
    if dtype is not None:
        layout = Layout([(e.name, dtype if is_averaged(e.dtype) else e.dtype, e.shape) for e in layout])
    _say(args, f"{method}: base {base.path if base else '(none)'}, inputs " + ", ".join(str(s.path) for s in opened))
    metadata = safetensors_metadata(
        "merged",
        method=method,
        weights=json.dumps(per_model),
        options=json.dumps(options),
        base=json.dumps(None if base is None else {"path": str(base.path), "sha256": _fingerprint(base.path)}),
        inputs=json.dumps([{"path": str(s.path), "sha256": _fingerprint(s.path)} for s in opened]),
    )
    tensors = [s.tensors for s in opened]
    origin = base.tensors if base is not None else None
    bar = progress_bar((len(everything)) * layout.nbytes, f"{method}: merging {len(opened)} models", args.quiet)

    def progress(written: int) -> None:
        bar.update(written * len(everything))

    def chunks(part: Layout) -> Iterator[memoryview]:
        return elementwise_chunks(part, origin, tensors, method, per_model, options, dtype, progress)

    try:
        if as_folder:
            atomic_folder(output, lambda folder: _write_hf_folder(folder, base or opened[0], layout, chunks, metadata))
        else:
            write_safetensors(output, layout, chunks(layout), metadata)
    finally:
        bar.close()
    _say(args, f"merged {len(opened)} models with {method} into {output}")
    return 0


def _fingerprint(path: Path) -> str:
    """The sha256 of an input's weights: the file, or a folder's weight files in name order."""
    files = (
        [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    )
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


MERGEKIT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _merge_config(args: argparse.Namespace, path: Path) -> int:
    """A mergekit YAML config: ``merge_method``, ``base_model``, ``models`` (each ``model`` with
    ``parameters: {weight, ...}``), ``parameters`` and ``dtype``. ``slices`` and per-layer
    gradients are refused, naming the field."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UsageError(f"{path}: cannot read it as YAML: {err}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a mapping with merge_method, models, ...")
    known = {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source", "out_dtype"}
    if "slices" in config:
        raise UsageError(f"{path}: field 'slices' (layer ranges) is not supported; list whole models under 'models'")
    unknown = sorted(set(config) - known)
    if unknown:
        raise UsageError(f"{path}: unknown field {unknown[0]!r} (known: {sorted(known)})")
    method = str(config.get("merge_method", "")).lower()
    models = config.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, dict) and "model" in m for m in models):
        raise UsageError(f"{path}: field 'models' must be a list of {{model: <path>, parameters: {{...}}}}")
    base = config.get("base_model")
    folder = path.parent
    # As mergekit reads them: relative to the working directory; else beside the config file.
    resolve = lambda p: str(p if Path(p).is_absolute() or Path(p).exists() else folder / p)  # noqa: E731
    entries = [(resolve(m["model"]), dict(m.get("parameters") or {})) for m in models]
    if base is not None:
        entries = [(p, params) for p, params in entries if Path(p).resolve() != Path(resolve(base)).resolve()]
    options = dict(config.get("parameters") or {})
    for key, value in options.items():
        if isinstance(value, list) and value and not all(isinstance(v, dict) for v in value):
            raise UsageError(
                f"{path}: parameters.{key}: per-layer gradients are not supported; give a value or filter rules"
            )
    weights = [float(params.pop("weight", 1.0)) for _, params in entries]
    for key in sorted({k for _, params in entries for k in params}):
        values = [params.get(key) for _, params in entries]
        if len({json.dumps(v) for v in values}) > 1:
            raise UsageError(
                f"{path}: models[*].parameters.{key} differs between models: give it once under 'parameters'"
            )
        options.setdefault(key, values[0])
    dtype_name = config.get("out_dtype") or config.get("dtype")
    if dtype_name is not None and dtype_name not in MERGEKIT_DTYPES:
        raise UsageError(f"{path}: dtype {dtype_name!r}: expected one of {sorted(MERGEKIT_DTYPES)}")
    dtype = MERGEKIT_DTYPES[dtype_name] if dtype_name else None
    paths = [Path(p) for p, _ in entries]
    if method == "linear":
        if options.pop("normalize", True) is False:
            raise UsageError(f"{path}: linear with normalize: false is task arithmetic without a base: not supported")
        args.inputs, args.weights, args.method = [str(p) for p in paths], ",".join(map(str, weights)), "weights"
        args.config, args.option = None, [f"{k}={json.dumps(v)}" for k, v in options.items()]
        args.last = None
        return command_merge(args)
    if not is_elementwise(method):
        raise UsageError(f"{path}: merge_method {method!r}: expected linear or one of {elementwise_names()}")
    return merge_elementwise(args, paths, None if base is None else resolve(base), method, weights, options, dtype)


def command_export(args: argparse.Namespace) -> int:
    """The merged weights a Lightning checkpoint recorded (``ckptavg.load_merged_weights``)."""
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise UsageError(f"-o {output}: export writes one .safetensors file")
    check_output(output, [Path(args.checkpoint)], args.force, folder=False)
    merged = load_merged_weights(args.checkpoint, averager=args.averager)
    layout = Layout.from_tensors(merged)
    write_safetensors(
        output, layout, tensor_chunks(layout, merged), safetensors_metadata("merged", source=str(args.checkpoint))
    )
    _say(args, f"wrote the merged weights of {args.checkpoint} to {args.output}")
    return 0


# -- inspect and verify --------------------------------------------------------------------------


def _sha256(path: Path, bar: Any) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def inspect_path(
    path: Path, quiet: bool = True, verify: bool = True, correlation: bool = True, key: str | None = None
) -> dict[str, Any]:
    """What a window folder, checkpoint file or Hugging Face folder holds (never changes it)."""
    if is_window(path):
        from .window import CheckpointWindow

        report: dict[str, Any] = {"path": str(path), "kind": "ckptavg window", "ranks": []}
        for folder in rank_dirpaths(path):
            with CheckpointWindow.open(folder, readonly=True) as window:
                layout = window.full_layout if window.sharding is None else window.layout
                damaged = window.verify() if verify else None
                diagnostic = (
                    window.correlation() if correlation and window.sharding is None and len(window) >= 2 else None
                )
                report["ranks"].append({
                    "folder": str(folder), "steps": window.steps, "window": window.window,
                    "stored_bytes": window.stored_nbytes, "tensors": _tensor_summary(layout) if layout else {},
                    "files": _manifest_files(folder), "damaged": damaged,
                    "correlation": None if diagnostic is None else {**diagnostic.summary(), "reason": diagnostic.reason},
                })  # fmt: skip
        return report
    source = open_source(path, key)
    files = (
        [source.path]
        if source.path.is_file()
        else sorted(p for p in source.path.iterdir() if p.suffix == ".safetensors")
    )
    total = sum(f.stat().st_size for f in files)
    bar = progress_bar(total, f"checksums of {source.path}", quiet)
    try:
        checksums = {str(f): _sha256(f, bar) for f in files}
    finally:
        bar.close()
    layout = Layout([(n, d, s) for n, (d, s) in describe(source.tensors).items()])
    report = {"path": str(source.path), "kind": "Hugging Face folder" if source.path.is_dir() else "checkpoint file",
              "tensors": _tensor_summary(layout), "sha256": checksums, "step": source.step}  # fmt: skip
    if source.key is not None:
        report["state_dict_key"] = source.key
    metadata = getattr(source.tensors, "metadata", None)
    if metadata:
        report["metadata"] = {k: _parsed(v) for k, v in metadata.items()}
    averagers = _averager_states(source.contents)
    if averagers:
        report["averagers"] = averagers
        report["hint"] = (
            f"this checkpoint holds a ckptavg window: ckptavg export {source.path} -o merged.safetensors writes the merge it measured"
        )
    return report


def _parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _averager_states(obj: Any) -> dict[str, Any]:
    """The ``CheckpointAverager`` states a loaded Lightning checkpoint carries: window steps and merge."""
    callbacks = obj.get("callbacks") if isinstance(obj, Mapping) else None
    found = {}
    for name, state in (callbacks or {}).items():
        if str(name).startswith("CheckpointAverager") and isinstance(state, Mapping):
            window = state.get("window") or {}
            found[str(name)] = {
                "merge": state.get("merge"),
                "storage": window.get("storage"),
                "steps": list(window.get("steps", [])),
            }
    return found


def _tensor_summary(layout: Layout) -> dict[str, Any]:
    dtypes: dict[str, int] = {}
    for entry in layout:
        dtypes[dtype_code(entry.dtype)] = dtypes.get(dtype_code(entry.dtype), 0) + entry.numel
    largest = max(layout, key=lambda e: e.numel, default=None)
    return {"count": len(layout), "elements": sum(dtypes.values()), "bytes": layout.nbytes, "elements_by_dtype": dtypes,
            "largest": None if largest is None else {"name": largest.name, "shape": list(largest.shape)}}  # fmt: skip


def _manifest_files(folder: Path) -> list[dict[str, Any]]:
    from .storage import DiskStore

    manifest = DiskStore.read_manifest(folder)
    return [
        {"step": r["step"], "file": r["file"], "bytes": r["nbytes"], "crc32": r.get("group_crc32")}
        for r in manifest["snapshots"]
    ]


def command_inspect(args: argparse.Namespace) -> int:
    report = inspect_path(Path(args.path), quiet=args.quiet or args.json, verify=not args.no_verify, key=args.key)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)
    damaged = [d for r in report.get("ranks", []) for d in (r.get("damaged") or [])]
    return 1 if damaged else 0


def _print_report(report: dict[str, Any]) -> None:
    print(
        f"{report['path']}: {report['kind']}" + (f", step {report['step']}" if report.get("step") is not None else "")
    )
    for rank in report.get("ranks", []):
        t = rank["tensors"]
        print(
            f"  {rank['folder']}: steps {rank['steps']} (window {rank['window']}), {human_size(rank['stored_bytes'])} stored"
        )
        if t:
            print(f"    {t['count']} tensors, {t['elements'] / 1e6:.2f}M elements by dtype {t['elements_by_dtype']}")
        for f in rank["files"]:
            print(f"    step {f['step']:>8}: {f['file']} {human_size(f['bytes'])} crc32 {f['crc32']}")
        if rank.get("correlation"):
            c = rank["correlation"]
            print(
                f"    correlation: {c['verdict']} ({c['reason']}); update cosine {c['update_cosine']:.3f}, spread {c['relative_spread']:.4f}"
            )
        if rank["damaged"] is not None:
            print(
                f"    verify: {'damaged: ' + ', '.join(rank['damaged']) if rank['damaged'] else 'every file reads back and matches its checksums'}"
            )
    if "sha256" in report:
        t = report["tensors"]
        if report.get("state_dict_key"):
            print(f"  the state dict is its entry {report['state_dict_key']!r}")
        print(
            f"  {t['count']} tensors, {t['elements'] / 1e6:.2f}M elements by dtype {t['elements_by_dtype']}, largest {t['largest']}"
        )
        metadata = report.get("metadata") or {}
        if metadata.get("ckptavg") == "merged" or metadata.get("format") == "ckptavg.merged":
            print(
                f"  a ckptavg merge: method {metadata.get('method')}, steps {metadata.get('steps', 'not recorded')}, coefficients {metadata.get('coefficients')}"
            )
            for name in ("options", "inputs", "selected", "selected_by", "candidate_scores", "source", "module"):
                if name in metadata:
                    print(f"    {name}: {metadata[name]}")
        for name, state in (report.get("averagers") or {}).items():
            print(f"  {name}: a {state['storage']} window of steps {state['steps']}, merge {state['merge']}")
        if report.get("hint"):
            print(f"  {report['hint']}")
        for name, digest in report["sha256"].items():
            print(f"  sha256 {digest}  {name}")


def verify_path(path: Path, key: str | None = None) -> list[str]:
    """Every problem found reading ``path`` back: a window folder's files against their checksums;
    any other checkpoint's headers, sizes, shards and values (NaN or Inf in a float tensor is
    reported). Returns ``"<file>: <problem>"`` lines; empty when everything reads back."""
    if is_window(path):
        report = inspect_path(
            path, quiet=True, verify=True, correlation=False
        )  # reading every file back is the whole job
        return [
            f"{Path(r['folder']) / name}: its checksums do not match" for r in report["ranks"] for name in r["damaged"]
        ]
    try:
        source = open_source(path, key)
    except (UsageError, ValueError) as err:
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            return [f"{path}: {err}"]  # unreadable: a damaged file
        raise
    problems = []
    if source.path.is_dir():
        for file in sorted(source.path.glob("*.safetensors")):
            problems += _safetensors_size_problems(file)
    elif source.path.suffix == ".safetensors":
        problems += _safetensors_size_problems(source.path)
    if problems:
        return problems
    for name in source.tensors:
        try:
            tensor = source.tensors[name]
        except Exception as err:  # a shard cut short, a bad offset
            problems.append(f"{source.path}: tensor {name!r} cannot be read: {err}")
            continue
        if tensor.is_floating_point() and not all_finite(tensor):
            problems.append(f"{source.path}: tensor {name!r} holds NaN or Inf")
    return problems


def _safetensors_size_problems(file: Path) -> list[str]:
    """A safetensors file's size against what its header says its data takes."""
    try:
        with file.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return [f"{file}: its header cannot be read: {err}"]
    size, expected = file.stat().st_size, 8 + length + end
    return [] if size == expected else [f"{file}: {size} bytes, its header describes {expected}"]


def command_verify(args: argparse.Namespace) -> int:
    path = Path(args.path)
    problems = verify_path(path, args.key)
    if args.json:
        print(json.dumps({"path": str(path), "ok": not problems, "damaged": problems}, indent=1))
    else:
        for problem in problems:
            print(f"damaged: {problem}")
        if not problems and not args.quiet:
            print(
                f"{path}: every file reads back"
                + (" and matches its checksums" if is_window(path) else ", with finite values")
            )
    return 1 if problems else 0


# -- plumbing ------------------------------------------------------------------------------------


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text)


def _command(commands: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptavg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"ckptavg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = _command(commands, "merge", "merge checkpoints (oldest first) into one",
                     "Merge checkpoints, oldest first, with one coefficient vector.\n\n" + __doc__.split("\n\n")[2])  # fmt: skip
    merge.add_argument(
        "inputs",
        nargs="*",
        help="files (.safetensors .pt .pth .bin .ckpt), Hugging Face folders, a window folder, or globs",
    )
    merge.add_argument(
        "--method",
        default="sma",
        help=f"merge method: {', '.join(method_names())}; for models fine-tuned from --base: {', '.join(elementwise_names())} (default sma)",
    )
    merge.add_argument("--base", help="the base model the inputs were fine-tuned from (element-wise methods)")
    merge.add_argument(
        "--config", help="a mergekit-style YAML file (merge_method, base_model, models, parameters, dtype)"
    )
    merge.add_argument("--weights", help="explicit weights, one per input, oldest first: 0.2,0.8 (scaled to sum to 1)")
    merge.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="EMA coefficient (default 0.2)")
    merge.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="a method option: --option shape=1-sqrt"
    )
    merge.add_argument(
        "--last", type=int, help="merge only the newest N inputs (of a window folder: its newest N snapshots)"
    )
    merge.add_argument(
        "--key",
        help="the entry of torch files that holds the state dict (default: the file itself, or state_dict, model, module, ema, ...)",
    )
    merge.add_argument(
        "-o",
        "--output",
        required=True,
        help="a .safetensors path writes one file; any other path a folder (Hugging Face inputs: sharded as the oldest, with its config and tokenizer)",
    )
    merge.add_argument("--force", action="store_true", help="replace an existing output (never an input)")
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    merge.set_defaults(run=command_merge)
    export = _command(commands, "export", "write the merged weights a Lightning checkpoint measured",
                      "Write the merged weights of a Lightning checkpoint saved with a CheckpointAverager: the merge of the window it recorded.")  # fmt: skip
    export.add_argument("checkpoint", help="a Lightning .ckpt saved with CheckpointAverager in the callbacks")
    export.add_argument("-o", "--output", required=True, help="output .safetensors file")
    export.add_argument("--averager", help="a part of the averager's state key, when the run had several")
    export.add_argument("--force", action="store_true", help="replace an existing output")
    export.add_argument("-q", "--quiet", action="store_true", help="no summary")
    export.set_defaults(run=command_export)
    inspect = _command(commands, "inspect", "what a window, checkpoint or Hugging Face folder holds",
                       "Show what a window folder, checkpoint file or Hugging Face folder holds: tensors, steps, checksums, a merge's\n"
                       "recorded method, steps and coefficients, and whether a Lightning checkpoint carries a window. Exit 1 when\n"
                       "a window's file is damaged.")  # fmt: skip
    inspect.add_argument(
        "path", help="a window folder, a checkpoint file, a Hugging Face folder or its model.safetensors.index.json"
    )
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--no-verify", action="store_true", help="window folders: skip reading every file back")
    inspect.add_argument("--key", help="the entry of a torch file that holds the state dict")
    inspect.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    inspect.set_defaults(run=command_inspect)
    verify = _command(commands, "verify", "read a window, checkpoint or Hugging Face folder back; exit 1 naming what is damaged",
                      "Read every file back: a window's files against their checksums; any other checkpoint's headers, sizes,\n"
                      "shards and values (NaN or Inf is damage). Exit 1 naming each damaged file; nothing is changed.")  # fmt: skip
    verify.add_argument("path", help="a window folder, a checkpoint file or a Hugging Face folder")
    verify.add_argument("--key", help="the entry of a torch file that holds the state dict")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.add_argument("-q", "--quiet", action="store_true", help="print only damaged files")
    verify.set_defaults(run=command_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (UsageError, ValueError, KeyError, OSError, CorruptSnapshotError) as err:
        print(f"ckptavg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: say so, without a traceback
        print(
            f"ckptavg {args.command}: internal error ({type(err).__name__}): {err}. Please report it", file=sys.stderr
        )
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
