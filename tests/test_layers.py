"""Imports run one way (docs/DESIGN.md, "Layers"): every module of lowbit/ is parsed with
``ast`` (imports inside functions, methods and ``if TYPE_CHECKING:`` blocks count too) and
mapped to its layer; an import of a higher layer fails naming the file, the line and both
layers.

The order, top to bottom; a layer may import any layer below it. Modules of one layer (one
package, or one top-level module) import each other freely. Layers that share a rank (eval and
infer; loading and the transformers hook; models, data and report; the leaf utilities) are
peers that never import each other: each may be used without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lowbit

ROOT = Path(lowbit.__file__).parent

ORDER: list[tuple[str, ...]] = [
    # The package root: runs first on any `import lowbit.x`, imports only the hook and the
    # version. Nothing in lowbit imports it (the version is read from lowbit._version), so
    # importing a module never depends on the root having finished.
    ("lowbit",),
    ("cli",),
    ("api",),  # the façade: re-exports only
    ("pipeline",),  # the orchestration behind the façade
    ("eval", "infer"),
    # loading: models by name (eval and infer load by name). _hf_hook: transformers' way in,
    # registers export's HF quantizer when transformers loads its registry; only the root
    # imports it.
    ("loading", "_hf_hook"),
    ("export",),
    ("engine",),
    ("algorithms",),
    ("core",),
    ("nn",),
    ("kernels",),
    ("formats",),
    ("models", "data", "report"),
    ("memory", "atomic", "errors", "_version"),  # leaf utilities
]
RANK = {layer: len(ORDER) - i for i, peers in enumerate(ORDER) for layer in peers}


def module_name(path: Path, root: Path) -> str:
    """``lowbit.x.y`` of ``root/x/y.py`` (a package's ``__init__.py`` is the package)."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """``lowbit.engine.sequential`` -> ``engine``; ``lowbit.api`` -> ``api``; the package
    root ``lowbit`` -> ``lowbit``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported(path: Path, root: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every lowbit module ``path`` imports, anywhere in the file.
    ``from lowbit import x`` imports ``lowbit.x`` (a module, or a name of the root);
    relative imports are resolved against the module's package."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == root.name:
                out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                out.append((node.lineno, target))
    return [(line, m) for line, m in out if m == root.name or m.startswith(root.name + ".")]


def violations(root: Path) -> list[str]:
    """Every import of a higher layer, or of a peer, under ``root`` (a copy of lowbit/)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        here = layer_of(module_name(path, root))
        for line, target in imported(path, root):
            there = layer_of(target)
            if there.startswith("__"):  # `from lowbit import __version__`: the root
                there = root.name
            if there == here:
                continue
            where = f"{path.relative_to(root.parent)}:{line}"
            if there not in RANK:
                found.append(f"{where}: imports {target}, which has no layer")
            elif RANK[there] > RANK[here]:
                found.append(f"{where}: {here} imports {target} of the higher layer {there}")
            elif RANK[there] == RANK[here]:
                found.append(f"{where}: {here} imports {target} of its peer layer {there}")
    return found


def test_every_module_has_a_layer():
    unplaced = sorted(
        module_name(p, ROOT) for p in ROOT.rglob("*.py")
        if layer_of(module_name(p, ROOT)) not in RANK
    )
    assert not unplaced, f"modules without a layer (add them to ORDER and DESIGN.md): {unplaced}"


def test_no_layer_is_empty_and_none_is_listed_twice():
    layers = [layer for peers in ORDER for layer in peers]
    assert len(layers) == len(set(layers))
    present = {layer_of(module_name(p, ROOT)) for p in ROOT.rglob("*.py")}
    assert not set(layers) - present, f"layers with no module: {set(layers) - present}"


def test_imports_run_one_way():
    found = violations(ROOT)
    assert not found, "imports against the layer order (docs/DESIGN.md):\n" + "\n".join(found)


def test_the_checker_sees_imports_a_layer_must_not_make(tmp_path):
    """The check cannot pass vacuously: a copy of lowbit/'s shape with planted imports of a
    higher layer (at module level, inside a function, relative, ``from lowbit import``) and
    of a peer is refused, each naming its file, line and both layers; allowed ones are not."""
    root = tmp_path / "lowbit"
    files = {
        "__init__.py": "from lowbit import _hf_hook\n",
        "_hf_hook.py": "def f():\n    from lowbit.export import hf\n",
        "api.py": "from lowbit.pipeline import quantizing\n",
        "errors.py": "",
        "export/__init__.py": "",
        "export/hf.py": "from .. import errors\n",
        "formats/__init__.py": "",
        "formats/element.py": "import torch\n\n\ndef bad():\n    from lowbit.api import x\n",
        "formats/fp.py": "from ..kernels import dispatch\nfrom . import element\n",
        "kernels/dispatch.py": "from lowbit import formats\n",
        "models/arch.py": "from lowbit.data import corpora\n",
        "data/corpora.py": "",
        "pipeline/quantizing.py": "from lowbit import api\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert violations(root) == [
        "lowbit/formats/element.py:5: formats imports lowbit.api of the higher layer api",
        "lowbit/formats/fp.py:1: formats imports lowbit.kernels of the higher layer kernels",
        "lowbit/models/arch.py:1: models imports lowbit.data of its peer layer data",
        "lowbit/pipeline/quantizing.py:1: pipeline imports lowbit.api of the higher layer api",
    ]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import lowbit.engine.sequential", ["lowbit.engine.sequential"]),
        ("from lowbit import api, loading", ["lowbit.api", "lowbit.loading"]),
        ("from lowbit.formats.element import get_format", ["lowbit.formats.element"]),
        ("from . import quantizing", ["lowbit.pipeline"]),
        ("from ..eval import kld", ["lowbit.eval"]),
        ("def f():\n    if True:\n        import lowbit.api", ["lowbit.api"]),
        ("import torch\nfrom typing import TYPE_CHECKING", []),
    ],
)
def test_imports_are_read_everywhere_in_a_file(tmp_path, source, expected):
    path = tmp_path / "lowbit" / "pipeline" / "saving.py"
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    assert [m for _, m in imported(path, tmp_path / "lowbit")] == expected
