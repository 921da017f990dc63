"""Text corpora for calibration and evaluation: bundled prose, local files, local HF datasets.

A corpus *spec* is one of

- a bundled name (``austen-pp``, ``austen-emma``, ..., ``brown``): public-domain prose shipped
  inside the package as ``lowbit/data/corpora/*.txt.gz``;
- ``wikitext2`` or ``c4``: the usual paper test sets, only when present on this machine (a file
  named by ``$LOWBIT_WIKITEXT2`` / ``$LOWBIT_C4``, or an already-downloaded Hugging Face cache);
  nothing is ever downloaded;
- a path to a UTF-8 text file (``.txt`` or gzipped ``.txt.gz``).

``load_text(spec)`` returns the whole corpus as one ``str``; tokenization and windowing happen
elsewhere (``lowbit.data.calibration``, ``lowbit.eval.windows``).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

_PACKAGE = "lowbit.data"
_FOLDER = "corpora"


@dataclass(frozen=True)
class BundledCorpus:
    """A text shipped with the package: ``file`` lives in ``lowbit/data/corpora/``."""

    name: str
    file: str
    description: str


@dataclass(frozen=True)
class CorpusInfo:
    """One row of ``list_corpora()``.

    ``size_chars`` is the text length in characters (``None`` when the corpus is not available
    here or would need loading a dataset to measure); ``available`` says whether ``load_text``
    would succeed for it on this machine.
    """

    name: str
    description: str
    source: str
    size_chars: int | None
    available: bool


BUNDLED_CORPORA: dict[str, BundledCorpus] = {
    c.name: c
    for c in (
        BundledCorpus(
            "austen-pp", "austen_prideprejudice.txt.gz", "Jane Austen, Pride and Prejudice (1813)"
        ),
        BundledCorpus("austen-emma", "austen_emma.txt.gz", "Jane Austen, Emma (1815)"),
        BundledCorpus(
            "austen-mansfield", "austen_mansfieldpark.txt.gz", "Jane Austen, Mansfield Park (1814)"
        ),
        BundledCorpus(
            "austen-northanger",
            "austen_northangerabbey.txt.gz",
            "Jane Austen, Northanger Abbey (1817)",
        ),
        BundledCorpus(
            "austen-persuasion", "austen_persuasion.txt.gz", "Jane Austen, Persuasion (1817)"
        ),
        BundledCorpus(
            "austen-sense",
            "austen_sensesensibility.txt.gz",
            "Jane Austen, Sense and Sensibility (1811)",
        ),
        BundledCorpus(
            "brown",
            "brown_all.txt.gz",
            "Brown corpus (1961 American English, 500 samples, 15 genres), tags stripped",
        ),
    )
}

#: Paper corpora that are used only when already present on this machine.
LOCAL_CORPORA: dict[str, str] = {
    "wikitext2": "WikiText-2 raw, test split, documents joined with blank lines (GPTQ protocol)",
    "c4": "C4 en, validation shard 0, first 1100 documents joined with spaces (GPTQ protocol)",
}

_ENV = {"wikitext2": "LOWBIT_WIKITEXT2", "c4": "LOWBIT_C4"}
_C4_SHARD = "c4-validation.00000-of-00008.json.gz"
_C4_DOCS = 1100


def text_sha256(text: str) -> str:
    """Hex sha256 of the UTF-8 bytes of ``text`` (recorded as the calibration-data hash)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_text(spec: str) -> str:
    """Return the text of corpus ``spec``: a bundled name, ``wikitext2``/``c4``, or a file path.

    Bundled Austen novels keep their layout (title, chapters, hard-wrapped lines) with leading
    blank lines stripped; line endings are normalised to ``\\n``. Raises ``LowbitError`` for an
    unknown name, a missing file, a non-UTF-8 or empty file, or a paper corpus absent here.
    """
    if spec in BUNDLED_CORPORA:
        return _load_bundled(spec)
    if spec in LOCAL_CORPORA:
        return _load_local(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return _read_text_file(path)
    if path.exists():
        raise LowbitError(f"corpus path '{spec}' is not a file; give a .txt or .txt.gz file")
    if os.sep in spec or spec.endswith((".txt", ".gz", ".raw", ".text")):
        raise LowbitError(f"corpus file '{spec}' does not exist; check the path")
    raise LowbitError(
        f"unknown corpus '{spec}'; bundled: {', '.join(BUNDLED_CORPORA)}; "
        f"local when present: {', '.join(LOCAL_CORPORA)}; or give a path to a .txt/.txt.gz file"
    )


def list_corpora() -> list[CorpusInfo]:
    """Every named corpus, bundled ones first, with its size and whether it is usable here."""
    rows = [
        CorpusInfo(c.name, c.description, "bundled", len(_load_bundled(c.name)), True)
        for c in BUNDLED_CORPORA.values()
    ]
    for name, description in LOCAL_CORPORA.items():
        try:
            found = _env_path(name) or _hub_file(name)
        except LowbitError as exc:
            rows.append(CorpusInfo(name, description, f"unusable: {exc}", None, False))
            continue
        if found is None and _datasets_cache_dir(name) is not None:
            found = _datasets_cache_dir(name)
        source = f"local: {found}" if found else f"absent here (set ${_ENV[name]})"
        rows.append(CorpusInfo(name, description, source, None, found is not None))
    return rows


def normalize_text(text: str) -> str:
    """``\\r\\n`` and ``\\r`` to ``\\n``, leading blank lines removed; nothing else changes."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.lstrip("\n")


@functools.lru_cache(maxsize=16)
def _load_bundled(name: str) -> str:
    ref = resources.files(_PACKAGE).joinpath(_FOLDER, BUNDLED_CORPORA[name].file)
    if not ref.is_file():
        raise LowbitError(
            f"bundled corpus file {BUNDLED_CORPORA[name].file} is missing from the installed "
            "package; reinstall lowbit (`make setup`)"
        )
    with ref.open("rb") as raw:
        data = gzip.decompress(raw.read())
    return normalize_text(data.decode("utf-8"))


def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        text = data.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise LowbitError(f"cannot read corpus file '{path}': {exc}") from exc
    except UnicodeDecodeError as exc:
        raise LowbitError(f"corpus file '{path}' is not UTF-8 text; convert it to UTF-8") from exc
    text = normalize_text(text)
    if not text.strip():
        raise LowbitError(f"corpus file '{path}' is empty; give a file with text in it")
    return text


def _env_path(name: str) -> Path | None:
    value = os.environ.get(_ENV[name])
    if not value:
        return None
    path = Path(value).expanduser()
    if name == "wikitext2" and path.is_dir():
        path = path / "wiki.test.raw"
    if name == "c4" and path.is_dir():
        path = path / _C4_SHARD
    if not path.is_file():
        raise LowbitError(
            f"${_ENV[name]} points to '{value}', which is not a file; fix it or unset it"
        )
    return path


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def _hub_file(name: str) -> Path | None:
    """A raw file of the dataset already in the HF hub cache (c4 json.gz only; no download)."""
    if name != "c4":
        return None
    found = sorted(_hub_cache().glob(f"datasets--allenai--c4/snapshots/*/en/{_C4_SHARD}"))
    return found[-1] if found else None


def _datasets_cache_dir(name: str) -> Path | None:
    """The ``datasets`` cache folder of a paper corpus, if one exists (not loaded)."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets"))
    patterns = (
        ("wikitext/wikitext-2-raw-v1", "Salesforce___wikitext/wikitext-2-raw-v1")
        if name == "wikitext2"
        else ("allenai___c4",)
    )
    for pattern in patterns:
        if (cache / pattern).is_dir():
            return cache / pattern
    return None


def _load_local(name: str) -> str:
    path = _env_path(name) or _hub_file(name)
    if path is not None:
        log.info("corpus %s from %s", name, path)
        return _read_local_file(name, path)
    text = _load_with_datasets(name)
    if text is None:
        raise LowbitError(
            f"corpus '{name}' is not present on this machine and lowbit never downloads; "
            f"set ${_ENV[name]} to a local copy "
            + (
                "(wiki.test.raw of wikitext-2-raw-v1, or a text file)"
                if name == "wikitext2"
                else f"({_C4_SHARD} of allenai/c4 en, or a text file)"
            )
            + ", or load it once into the Hugging Face datasets cache, or use a bundled corpus: "
            + ", ".join(BUNDLED_CORPORA)
        )
    return text


def _read_local_file(name: str, path: Path) -> str:
    if name == "c4" and path.name.endswith((".json.gz", ".jsonl.gz", ".json", ".jsonl")):
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        docs = []
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                docs.append(json.loads(line)["text"])
            if len(docs) == _C4_DOCS:
                break
        return " ".join(docs)
    return _read_text_file(path)


def _load_with_datasets(name: str) -> str | None:
    """Offline load through ``datasets`` from its local cache; ``None`` when not possible.

    ``datasets`` is optional. Offline mode is forced only for the duration of the call.
    """
    try:
        import datasets
    except ImportError:
        return None
    with _offline(datasets):
        for repo in ("wikitext", "Salesforce/wikitext") if name == "wikitext2" else ("allenai/c4",):
            try:
                if name == "wikitext2":
                    test = datasets.load_dataset(repo, "wikitext-2-raw-v1", split="test")
                    return "\n\n".join(test["text"])
                files = {"validation": f"en/{_C4_SHARD}"}
                valid = datasets.load_dataset(repo, data_files=files, split="validation")
                return " ".join(valid[:_C4_DOCS]["text"])
            except (OSError, ValueError) as exc:  # ConnectionError, FileNotFoundError: OSError
                log.info("datasets could not load %s (%s) offline: %s", name, repo, exc)
    return None


@contextlib.contextmanager
def _offline(datasets_module: Any) -> Iterator[None]:
    """Force HF offline mode (env and ``datasets.config``) inside the block, then restore."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in keys}
    saved_flag = getattr(datasets_module.config, "HF_DATASETS_OFFLINE", None)
    try:
        for k in keys:
            os.environ[k] = "1"
        datasets_module.config.HF_DATASETS_OFFLINE = True
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        datasets_module.config.HF_DATASETS_OFFLINE = saved_flag
