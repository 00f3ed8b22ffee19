"""Where snapshots live, behind one interface (:class:`SnapshotStore`): a host-memory ring
(:mod:`.cpu`) or safetensors files on disk (:mod:`.disk`, in the folder format of
:mod:`.manifest`).

Both tiers copy an incoming snapshot into a host buffer first and only then commit it, so a failed
snapshot never disturbs stored ones; a merge that finds NaN or Inf names the snapshots that hold it
(``non_finite``) and the window drops them (``drop``). Both
answer a merge the same way: they feed rows of blocks, with their coefficients, to the one kernel
in :mod:`ckptavg.kernels`.
"""

from .cpu import CpuRing
from .disk import PROGRESS_BYTES, DiskStore, progress_bar
from .manifest import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    RANKS_FORMAT,
    rank_dirpath,
    rank_dirpaths,
    snapshot_filename,
    write_ranks_manifest,
)
from .protocol import OTHER_RANK, SnapshotStore, warn_rejected

__all__ = [
    "MANIFEST",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "OTHER_RANK",
    "PROGRESS_BYTES",
    "RANKS_FORMAT",
    "CpuRing",
    "DiskStore",
    "SnapshotStore",
    "progress_bar",
    "rank_dirpath",
    "rank_dirpaths",
    "snapshot_filename",
    "warn_rejected",
    "write_ranks_manifest",
]
