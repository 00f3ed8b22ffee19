"""Issue 14 (packaging): the core (the window, merges, recovery, offline tools, the command line)
works without Lightning or torchmetrics; the callback says which extra to install."""

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import HANG_GUARD_S

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoLightning(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("lightning", "pytorch_lightning", "torchmetrics"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoLightning())
    import torch
    import ckptavg
    from ckptavg import CheckpointWindow, SpikeGuard, merge_state_dicts
    from ckptavg.cli import main
    from ckptavg.training import AveragerConfig, TrainingSession

    TrainingSession(AveragerConfig(window=2))

    model = torch.nn.Linear(4, 2)
    window = CheckpointWindow(window=2)
    window.snapshot(model, step=1)
    window.snapshot(model, step=2)
    window.load_into(model, "decay", shape="cosine")
    SpikeGuard(window).observe(1, 0.5)
    assert window.correlation().verdict == "average"
    try:
        ckptavg.CheckpointAverager
    except ModuleNotFoundError as err:
        assert "pip install 'ckptavg[lightning]'" in str(err), err
    else:
        raise AssertionError("CheckpointAverager imported without Lightning")
    assert not [m for m in sys.modules if m.startswith(("lightning", "torchmetrics", "transformers", "accelerate"))]
    print("core without lightning: ok")
    """
)


def test_the_core_needs_no_lightning(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0 and "core without lightning: ok" in done.stdout, done.stderr[-3000:]


PACKAGE = Path(__file__).resolve().parents[1] / "ckptavg"


def _module_imports() -> dict[str, set[str]]:
    """Each ckptavg module's imports of other ckptavg modules at import time (module level)."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
                for alias in node.names:  # `from . import x` imports the submodule x
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() else module)
        graph[name] = targets - {name}
    return graph


def test_no_import_cycles_and_only_the_lightning_package_imports_lightning():
    graph = _module_imports()
    assert "ckptavg.training" in graph and "ckptavg.lightning.callback" in graph
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module) :] + [module]))
        if module in done:
            return
        for target in graph.get(module, ()):
            if target != "ckptavg":  # the package's namespace re-exports; modules never import it at the top
                visit(target, path + [module])
        done.add(module)

    for module in graph:
        visit(module, [])
    assert (
        not {"ckptavg.training", "ckptavg.recovery", "ckptavg.selection", "ckptavg.offline"} & graph["ckptavg.window"]
    )
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "lightning" not in path.relative_to(PACKAGE).parts:
            assert "import lightning" not in text and "from lightning" not in text, path
        if "hf" not in path.relative_to(PACKAGE).parts:
            assert "import transformers" not in text and "from transformers" not in text, path
    private = [
        p.name
        for p in (PACKAGE / "lightning").glob("*.py")
        if "._logger_connector" in p.read_text() or "_results" in p.read_text()
    ]
    assert private == ["_internals.py"]
