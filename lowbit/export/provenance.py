"""What produced an export: lowbit version, the source DIR's recipe, and a hash of its files.

Every exported folder records this in its ``config.json`` (key ``lowbit_export``), so a served
checkpoint can be traced back to the lowbit DIR and the settings that made it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lowbit._version import __version__

CONFIG_KEY = "lowbit_export"


def dir_sha256(path: str | Path) -> str:
    """sha256 over the sorted relative paths and contents of every file under ``path``.

    Each file contributes ``relative_path NUL sha256(content) NUL``, so renaming, adding or
    changing any file changes the hash; the folder's own location does not.
    """
    root = Path(path)
    outer = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        inner = hashlib.sha256()
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(file.relative_to(root).as_posix().encode() + b"\0")
        outer.update(inner.hexdigest().encode() + b"\0")
    return outer.hexdigest()


def provenance(src: str | Path, manifest: dict[str, Any], target: str) -> dict[str, Any]:
    """The ``lowbit_export`` record of an export of lowbit DIR ``src`` to format ``target``."""
    return {
        "format": target,
        "lowbit_version": __version__,
        "source_lowbit_version": manifest.get("lowbit_version"),
        "source_dir_sha256": dir_sha256(src),
        "source_model": manifest.get("source_model"),
        "method": manifest.get("method"),
        "recipe": manifest.get("recipe"),
        "avg_bits": manifest.get("avg_bits"),
        "calibration": manifest.get("calibration"),
    }
