"""``ckptavg``: merge, inspect and verify checkpoints from the command line (no Lightning needed).

    ckptavg merge run/ckpts/*.safetensors --last 8 --method decay --option shape=1-sqrt -o merged.safetensors
    ckptavg merge a.ckpt b.ckpt --weights 0.3,0.7 -o merged.safetensors
    ckptavg merge hf-step-1000/ hf-step-2000/ -o hf-merged/        # Hugging Face folders: same sharding, configs copied
    ckptavg merge lightning_logs/version_0/ckptavg/window -o merged.safetensors   # a disk window (any number of ranks)
    ckptavg export lightning_logs/version_0/checkpoints/best.ckpt -o best-merged.safetensors   # the merge a checkpoint measured
    ckptavg inspect merged.safetensors --json
    ckptavg verify lightning_logs/version_0/ckptavg/window          # exit status 1 names every damaged file

Inputs are merged oldest first, in the order given (globs sorted by name). Files are read lazily,
tensor by tensor, and the output is written as it is computed: peak memory is about the largest
tensor times the number of inputs, never a whole model per input. Torch files are loaded with
``weights_only=True``: nothing is unpickled but tensors. Exit status: 0 done, 1 damage found,
2 bad input (the message names the file, key or argument).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .files import CorruptSnapshotError, atomic_write_bytes, human_size, safetensors_metadata, snapshot_header, tensor_bytes
from .kernels import weighted_sum_
from .layout import BLOCK_NUMEL, Entry, Layout, accumulation_dtype, dtype_code, is_averaged
from .methods import DEFAULT_ALPHA, coefficients, method_names
from .offline import consolidate, consolidated_steps, load_merged_weights, load_state_file
from .storage import MANIFEST, progress_bar, rank_dirpaths

HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class UsageError(ValueError):
    """Bad input: reported with the file, key or argument, exit status 2."""


# -- inputs --------------------------------------------------------------------------------------


@dataclass
class Source:
    """One input checkpoint: its tensors by name (read lazily), and where they came from."""

    path: Path
    tensors: Mapping[str, Tensor]
    shards: dict[str, str] | None = None  # Hugging Face: tensor name -> shard file name


class _Sharded(Mapping[str, Tensor]):
    """The tensors of a sharded Hugging Face folder, each read from its shard when asked for."""

    def __init__(self, folder: Path, weight_map: Mapping[str, str]):
        self._files = {name: load_state_file(folder / name) for name in sorted(set(weight_map.values()))}
        self._map = dict(weight_map)

    def __getitem__(self, name: str) -> Tensor:
        return self._files[self._map[name]][name]

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._files[self._map[name]].spec(name)  # type: ignore[attr-defined]  # shards are safetensors files

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)


def is_window(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def open_source(path: Path) -> Source:
    if path.is_dir():
        if (path / HF_INDEX).is_file():
            try:
                weight_map = json.loads((path / HF_INDEX).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise UsageError(f"{path / HF_INDEX}: cannot read its 'weight_map': {err!r}") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v and v.endswith(".safetensors") for v in weight_map.values()):
                raise UsageError(f"{path / HF_INDEX}: 'weight_map' must map tensor names to .safetensors files in the folder")
            return Source(path, _Sharded(path, weight_map), shards=dict(weight_map))
        if (path / HF_SINGLE).is_file():
            return Source(path, load_state_file(path / HF_SINGLE))
        raise UsageError(f"{path} is a folder with no {HF_SINGLE}, {HF_INDEX} or ckptavg window manifest")
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    try:
        return Source(path, load_state_file(path))
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


def expand(patterns: Sequence[str]) -> list[Path]:
    """Paths in the order given; a pattern that is not an existing path is a glob (sorted)."""
    paths: list[Path] = []
    for pattern in patterns:
        if Path(pattern).exists():
            paths.append(Path(pattern))
            continue
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise UsageError(f"{pattern}: no such file, folder or matching path")
        paths.extend(Path(m) for m in matches)
    return paths


def describe(tensors: Mapping[str, Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Names, dtypes and shapes, without reading any data (safetensors headers; torch files are
    memory-mapped)."""
    spec = getattr(tensors, "spec", None)
    return {name: spec(name) if spec is not None else (tensors[name].dtype, tuple(tensors[name].shape)) for name in tensors}


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


def merged_chunks(layout: Layout, sources: Sequence[Mapping[str, Tensor]], weights: Sequence[float], progress: Any) -> Iterator[memoryview]:
    """The merged tensors' bytes in file order, computed one block at a time with the window's
    kernel (:func:`ckptavg.kernels.weighted_sum_`: fp32 accumulation, fp64 for fp64); integer
    tensors from the newest input."""
    live = [(s, w) for s, w in zip(sources, weights, strict=True) if w != 0.0]
    accumulators: dict[torch.dtype, tuple[Tensor, Tensor]] = {}  # per accumulation dtype: (acc, scratch), reused
    for entry in file_order(layout):
        if not is_averaged(entry.dtype):
            yield tensor_bytes(sources[-1][entry.name].reshape(-1).contiguous())
            progress(entry.numel * entry.dtype.itemsize)
            continue
        rows = [(s[entry.name].reshape(-1), w) for s, w in live]
        acc_dtype = accumulation_dtype(entry.dtype)
        if acc_dtype not in accumulators:
            accumulators[acc_dtype] = (torch.empty(BLOCK_NUMEL, dtype=acc_dtype), torch.empty(BLOCK_NUMEL, dtype=acc_dtype))
        acc, scratch = accumulators[acc_dtype]
        for lo in range(0, entry.numel, BLOCK_NUMEL):
            hi = min(lo + BLOCK_NUMEL, entry.numel)
            block = weighted_sum_(acc[: hi - lo], ((row[lo:hi], w) for row, w in rows), scratch)
            if not torch.isfinite(block).all():
                raise UsageError(f"tensor {entry.name!r}: the merge is not finite (NaN or Inf in an input, or weights that overflow)")
            yield tensor_bytes(block.to(entry.dtype))
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

    atomic_write_bytes(path, stream())


def command_merge(args: argparse.Namespace) -> int:
    paths = expand(args.inputs)
    if args.last is not None:
        if args.last < 1:
            raise UsageError(f"--last must be a positive integer, got {args.last}")
        paths = paths[-args.last :]
    options = parse_options(args.option)
    try:
        weights_arg = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        raise UsageError(f"--weights {args.weights!r}: expected numbers separated by commas, e.g. --weights 0.2,0.8") from None
    method: Any = weights_arg if weights_arg is not None else args.method
    output = Path(args.output)
    windows = [p for p in paths if is_window(p)]
    if windows:
        if len(paths) != 1:
            raise UsageError(f"{windows[0]} is a ckptavg window folder: merge it on its own (its snapshots are the inputs)")
        merged = consolidate(paths[0], method, args.alpha, **options)
        steps = consolidated_steps(paths[0])
        metadata = _metadata(method, coefficients(method, steps, args.alpha, **options), [str(paths[0])], options, steps)
        layout = Layout.from_tensors(merged)
        write_safetensors(_output_file(output), layout, tensor_chunks(layout, merged), metadata)
        _say(args, f"merged {len(steps)} snapshots of {paths[0]} into {output}")
        return 0
    if len(paths) < 1:
        raise UsageError("no inputs")
    opened = [open_source(p) for p in paths]
    weights = coefficients(method, len(opened), args.alpha, **options)
    layout = _checked_layout(opened)
    metadata = _metadata(method, weights, [str(p) for p in paths], options, None)
    first = opened[0]
    live = sum(1 for w in weights if w)
    bar = progress_bar(live * layout.nbytes, f"merging {len(opened)} checkpoints", args.quiet)  # the bytes read

    def progress(written: int) -> None:
        bar.update(written * live)

    try:
        if first.shards is not None or (first.path.is_dir() and not str(output).endswith(".safetensors")):
            _write_hf_folder(output, first, layout, [s.tensors for s in opened], weights, metadata, progress)
        else:
            write_safetensors(_output_file(output), layout, merged_chunks(layout, [s.tensors for s in opened], weights, progress), metadata)
    finally:
        bar.close()
    _say(args, f"merged {len(opened)} checkpoints ({args.method if weights_arg is None else 'weights'}: {[round(w, 4) for w in weights]}) into {output}")
    return 0


def _checked_layout(sources: Sequence[Source]) -> Layout:
    """The first input's tensors; every other input must have the same names, dtypes and shapes
    (checked before anything is computed or written)."""
    reference = describe(sources[0].tensors)
    for source in sources[1:]:
        other = describe(source.tensors)
        missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
        if missing or extra:
            raise UsageError(f"{source.path}: tensors differ from {sources[0].path}: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, (dtype, shape) in reference.items():
            if other[name] != (dtype, shape):
                raise UsageError(f"{source.path}: tensor {name!r} is {other[name][0]} {list(other[name][1])}, in {sources[0].path} {dtype} {list(shape)}")
    return Layout([(name, dtype, shape) for name, (dtype, shape) in reference.items()])


def _metadata(method: Any, weights: Sequence[float], inputs: list[str], options: dict[str, Any], steps: list[int] | None) -> dict[str, str]:
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


def _output_file(output: Path) -> Path:
    """``-o``: a file, or an existing folder (the file is then its ``model.safetensors``)."""
    if output.is_dir():
        return output / HF_SINGLE
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def _write_hf_folder(
    output: Path, first: Source, layout: Layout, sources: list[Mapping[str, Tensor]], weights: Sequence[float], metadata: dict[str, str], progress: Any
) -> None:
    """A Hugging Face folder: the first input's sharding (each shard written as it is computed),
    its index, and its other files (configs, tokenizer) copied."""
    output.mkdir(parents=True, exist_ok=True)
    shards = first.shards or {e.name: HF_SINGLE for e in layout}
    for shard in sorted(set(shards.values())):
        names = [e.name for e in layout if shards[e.name] == shard]
        part = Layout([(n, layout.entries[n].dtype, layout.entries[n].shape) for n in names])
        write_safetensors(output / shard, part, merged_chunks(part, sources, weights, progress), metadata)
    if first.shards is not None:
        index = json.loads((first.path / HF_INDEX).read_text())
        index.setdefault("metadata", {})["ckptavg"] = metadata
        (output / HF_INDEX).write_text(json.dumps(index, indent=2))
    for item in sorted(first.path.iterdir()):
        if item.is_file() and not item.is_symlink() and item.suffix not in WEIGHT_SUFFIXES and item.name != HF_INDEX:
            shutil.copy2(item, output / item.name)


def command_export(args: argparse.Namespace) -> int:
    """The merged weights a Lightning checkpoint recorded (``ckptavg.load_merged_weights``)."""
    merged = load_merged_weights(args.checkpoint, averager=args.averager)
    layout = Layout.from_tensors(merged)
    metadata = safetensors_metadata("merged", source=str(args.checkpoint))
    write_safetensors(_output_file(Path(args.output)), layout, tensor_chunks(layout, merged), metadata)
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


def inspect_path(path: Path, quiet: bool = True, verify: bool = True, correlation: bool = True) -> dict[str, Any]:
    """What a window folder, checkpoint file or Hugging Face folder holds (never changes it)."""
    if is_window(path):
        from .window import CheckpointWindow

        report: dict[str, Any] = {"path": str(path), "kind": "ckptavg window", "ranks": []}
        for folder in rank_dirpaths(path):
            with CheckpointWindow.open(folder, readonly=True) as window:
                layout = window.full_layout if window.sharding is None else window.layout
                damaged = window.verify() if verify else None
                diagnostic = window.correlation() if correlation and window.sharding is None and len(window) >= 2 else None
                report["ranks"].append({
                    "folder": str(folder), "steps": window.steps, "window": window.window,
                    "stored_bytes": window.stored_nbytes, "tensors": _tensor_summary(layout) if layout else {},
                    "files": _manifest_files(folder), "damaged": damaged,
                    "correlation": None if diagnostic is None else {**diagnostic.summary(), "reason": diagnostic.reason},
                })  # fmt: skip
        return report
    source = open_source(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    total = sum(f.stat().st_size for f in files)
    bar = progress_bar(total, f"checksums of {path}", quiet)
    try:
        checksums = {str(f): _sha256(f, bar) for f in files}
    finally:
        bar.close()
    layout = Layout([(n, d, s) for n, (d, s) in describe(source.tensors).items()])
    return {"path": str(path), "kind": "Hugging Face folder" if path.is_dir() else "checkpoint file",
            "tensors": _tensor_summary(layout), "sha256": checksums}  # fmt: skip


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
    return [{"step": r["step"], "file": r["file"], "bytes": r["nbytes"], "crc32": r.get("group_crc32")} for r in manifest["snapshots"]]


def command_inspect(args: argparse.Namespace) -> int:
    report = inspect_path(Path(args.path), quiet=args.quiet or args.json, verify=not args.no_verify)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)
    damaged = [d for r in report.get("ranks", []) for d in (r.get("damaged") or [])]
    return 1 if damaged else 0


def _print_report(report: dict[str, Any]) -> None:
    print(f"{report['path']}: {report['kind']}")
    for rank in report.get("ranks", []):
        t = rank["tensors"]
        print(f"  {rank['folder']}: steps {rank['steps']} (window {rank['window']}), {human_size(rank['stored_bytes'])} stored")
        if t:
            print(f"    {t['count']} tensors, {t['elements'] / 1e6:.2f}M elements by dtype {t['elements_by_dtype']}")
        for f in rank["files"]:
            print(f"    step {f['step']:>8}: {f['file']} {human_size(f['bytes'])} crc32 {f['crc32']}")
        if rank.get("correlation"):
            c = rank["correlation"]
            print(f"    correlation: {c['verdict']} ({c['reason']}); update cosine {c['update_cosine']:.3f}, spread {c['relative_spread']:.4f}")
        if rank["damaged"] is not None:
            print(f"    verify: {'damaged: ' + ', '.join(rank['damaged']) if rank['damaged'] else 'every file reads back and matches its checksums'}")
    if "sha256" in report:
        t = report["tensors"]
        print(f"  {t['count']} tensors, {t['elements'] / 1e6:.2f}M elements by dtype {t['elements_by_dtype']}, largest {t['largest']}")
        for name, digest in report["sha256"].items():
            print(f"  sha256 {digest}  {name}")


def command_verify(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not is_window(path):
        raise UsageError(f"{path} is not a ckptavg window folder (no {MANIFEST})")
    report = inspect_path(path, quiet=True, verify=True, correlation=False)  # reading every file back is the whole job
    damaged = [(r["folder"], d) for r in report["ranks"] for d in r["damaged"]]
    for folder, name in damaged:
        print(f"damaged: {Path(folder) / name}")
    if not damaged and not args.quiet:
        held = sum(len(r["steps"]) for r in report["ranks"])
        print(f"{path}: {held} snapshots, every file reads back and matches its checksums")
    return 1 if damaged else 0


# -- plumbing ------------------------------------------------------------------------------------


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckptavg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge checkpoints (oldest first) into one", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Merge checkpoints, oldest first, with one coefficient vector.\n\n" + __doc__.split("\n\n")[1])  # fmt: skip
    merge.add_argument("inputs", nargs="+", help="files (.safetensors .pt .pth .bin .ckpt), Hugging Face folders, a window folder, or globs")
    merge.add_argument("--method", default="sma", help=f"merge method: {', '.join(method_names())} (default sma)")
    merge.add_argument("--weights", help="explicit weights, one per input, oldest first: 0.2,0.8 (scaled to sum to 1)")
    merge.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="EMA coefficient (default 0.2)")
    merge.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option: --option shape=1-sqrt")
    merge.add_argument("--last", type=int, help="merge only the last N inputs")
    merge.add_argument("-o", "--output", required=True, help="output .safetensors file, or folder (Hugging Face inputs)")
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    merge.set_defaults(run=command_merge)
    export = commands.add_parser("export", help="the merged weights a Lightning checkpoint of a CheckpointAverager run measured")
    export.add_argument("checkpoint", help="a Lightning .ckpt saved with CheckpointAverager in the callbacks")
    export.add_argument("-o", "--output", required=True, help="output .safetensors file")
    export.add_argument("--averager", help="a part of the averager's state key, when the run had several")
    export.add_argument("-q", "--quiet", action="store_true", help="no summary")
    export.set_defaults(run=command_export)
    inspect = commands.add_parser("inspect", help="what a window, checkpoint or Hugging Face folder holds")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--no-verify", action="store_true", help="window folders: skip reading every file back")
    inspect.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    inspect.set_defaults(run=command_inspect)
    verify = commands.add_parser("verify", help="read every file of a window folder back; exit 1 naming damaged ones")
    verify.add_argument("path")
    verify.add_argument("-q", "--quiet", action="store_true", help="print only damaged files")
    verify.set_defaults(run=command_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (UsageError, ValueError, FileNotFoundError, CorruptSnapshotError) as err:
        print(f"ckptavg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
