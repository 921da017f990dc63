"""Resumable block-by-block runs: after each finished block the engine persists what an
interrupted run needs to continue exactly where it stopped.

In the run's checkpoint folder (``OUT.ckpt`` for the CLI) a
:class:`~lowbit.engine.model_context.CheckpointStore` ``state.pt`` is the commit point, replaced
atomically and written last: ``{"kind": "ptq", "version", "run": the settings fingerprint,
"finished": index of the last finished block, "blocks", "threads", "seconds", "rng"}``. Beside it:

- ``block_0003.pt``: block 3 as quantized: its state dict (packed QuantLinear buffers, norms),
  each quantized linear's stored-weight description, and its layer reports (JSON text);
- ``inputs_0004.pt``: block 4's calibration inputs, the outputs of quantized block 3 (a list of
  ``[b, L, hidden]`` fp32); only the newest is kept.

After block ``i``: block file, inputs file, then ``state.pt``; the older inputs file is removed
last. A kill at any moment leaves ``state.pt`` naming a block whose files are all complete.
Resuming restores blocks ``0..finished`` from their files, re-captures the block call arguments
(position embeddings, masks: cheap and deterministic), takes the saved inputs instead of
re-running the finished blocks, and continues: the result is the uninterrupted run's, bit for
bit, when the thread count is the same (a warning says when it is not).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.atomic import atomic_file
from lowbit.core.report import LayerReport
from lowbit.engine.model_context import CheckpointStore
from lowbit.errors import LowbitError, write_error
from lowbit.models.arch import set_submodule
from lowbit.nn.quant_linear import QuantLinear

log = logging.getLogger(__name__)

KIND = "ptq"
VERSION = 1
# Fault injection for tests: SIGKILL this process once this many blocks are checkpointed.
KILL_AFTER_ENV = "LOWBIT_KILL_AFTER_BLOCKS"
_PATTERNS = ("block_*.pt", "inputs_*.pt", ".block_*.pt.*", ".inputs_*.pt.*", ".state.pt.*")


@dataclass
class Restored:
    """What a resumed run starts from: the next block to quantize, its calibration inputs
    (``None`` when every block is finished) and the finished blocks' layer reports."""

    next_block: int
    hidden: list[torch.Tensor] | None
    reports: list[LayerReport]


class BlockCheckpoints:
    """Per-block checkpoints of one sequential run (layout in the module doc).

    ``run`` fingerprints the settings (method config, calibration, model weights): a resume
    whose fingerprint differs is refused with the differing keys named.
    """

    def __init__(self, store: CheckpointStore, run: dict[str, Any]) -> None:
        self.store = store
        self.run = run
        self.earlier_seconds = 0.0  # spent by the interrupted attempts, once restored
        self._start = time.perf_counter()

    @property
    def folder(self) -> Path:
        return self.store.folder

    def restore(
        self, blocks: nn.ModuleList, restored: Callable[[nn.Module, int], None] | None = None
    ) -> Restored | None:
        """Put the finished blocks back into ``blocks``; ``None`` when there is no checkpoint.

        ``restored(block, index)``, when given, is called after each finished block is back
        (a streamed run releases it again at once). Without ``resume`` an existing checkpoint
        is an error (see ``CheckpointStore.load``).
        """
        try:
            state = self.store.load()
        except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as exc:
            raise self._unreadable(self.store.path, exc) from exc
        if state is None:
            return None
        self._check(state, len(blocks))
        finished = int(state["finished"])
        reports = []
        for index in range(finished + 1):
            reports.extend(self.restore_block(blocks[index], index))
            if restored is not None:
                restored(blocks[index], index)
        hidden = None
        if finished + 1 < len(blocks):
            hidden = self._load(_inputs_file(finished + 1))["hidden"]
        torch.set_rng_state(state["rng"])
        self.earlier_seconds = float(state["seconds"])
        _warn_threads(state["threads"])
        log.info("resuming %s after block %d of %d", self.folder, finished + 1, len(blocks))
        return Restored(finished + 1, hidden, reports)

    def block_done(
        self,
        index: int,
        blocks: int,
        block: nn.Module,
        reports: list[LayerReport],
        next_hidden: list[torch.Tensor] | None,
    ) -> None:
        """Persist quantized block ``index`` of ``blocks`` and the next block's inputs (blocks
        finished with it in one group first go through :meth:`save_block`)."""
        self.save_block(index, block, reports)
        try:
            if next_hidden is not None:
                self._save(_inputs_file(index + 1), {"hidden": next_hidden})
            self.store.save(self._state(index, blocks))
        except OSError as exc:
            raise write_error(
                self.folder, exc, "the blocks checkpointed so far are kept for --resume"
            ) from exc
        for old in self.folder.glob("inputs_*.pt"):
            if old.name != _inputs_file(index + 1):
                old.unlink(missing_ok=True)
        _maybe_kill(index + 1)

    def save_block(self, index: int, block: nn.Module, reports: list[LayerReport]) -> None:
        """Persist quantized block ``index`` alone; a resume still starts after the last block
        given to :meth:`block_done` (so a group of blocks counts only once all are saved)."""
        try:
            self._save(_block_file(index), _block_record(block, reports))
        except OSError as exc:
            raise write_error(
                self.folder, exc, "the blocks checkpointed so far are kept for --resume"
            ) from exc

    def _state(self, finished: int, blocks: int) -> dict[str, Any]:
        return {
            "kind": KIND,
            "version": VERSION,
            "run": self.run,
            "finished": finished,
            "blocks": blocks,
            "threads": torch.get_num_threads(),
            "seconds": self.earlier_seconds + time.perf_counter() - self._start,
            "rng": torch.get_rng_state(),
        }

    def _check(self, state: Any, blocks: int) -> None:
        where = self.folder
        if not isinstance(state, dict) or state.get("kind") != KIND:
            raise LowbitError(
                f"{where} holds the checkpoint of another kind of run (training); resume it with "
                "the same method, or remove the folder to start over"
            )
        if state.get("version") != VERSION or state.get("blocks") != blocks:
            raise LowbitError(
                f"checkpoint {where} was written by another lowbit version or for a model with "
                f"{state.get('blocks')} blocks (this one has {blocks}); remove it to start over"
            )
        diff = _differences(state["run"], self.run)
        if diff:
            raise LowbitError(
                f"checkpoint {where} was written with other settings ({diff}); resume with the "
                "same model, method settings and calibration, or remove it to start over"
            )

    def restore_block(self, block: nn.Module, index: int) -> list[LayerReport]:
        """Make ``block`` (on any device, meta included) quantized block ``index`` as saved;
        its layer reports."""
        data = self._load(_block_file(index))
        try:
            state = data["state"]
            for name, meta in json.loads(data["layers"]).items():
                prefix = f"{name}."
                own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                bias = own.pop("bias", None)
                set_submodule(block, name, QuantLinear.from_stored(meta, own, bias))
            block.load_state_dict(state, strict=True, assign=True)
        except (KeyError, ValueError, RuntimeError, AttributeError) as exc:
            raise self._unreadable(self.folder / _block_file(index), exc) from exc
        return [LayerReport(**r) for r in json.loads(data["reports"])]

    def _save(self, name: str, obj: Any) -> None:
        with atomic_file(self.folder / name) as tmp:
            torch.save(obj, tmp)

    def _load(self, name: str) -> dict[str, Any]:
        path = self.folder / name
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as exc:
            raise self._unreadable(path, exc) from exc

    def _unreadable(self, path: Path, exc: BaseException) -> LowbitError:
        cause = " ".join(str(exc).split()).split(". ")[0][:120] or type(exc).__name__
        return LowbitError(
            f"checkpoint file {path} is missing or unreadable ({cause}); remove {self.folder} "
            "to start over"
        )


def discard_checkpoints(folder: str | Path) -> None:
    """Remove a finished run's checkpoint files (block-wise and training) and the folder if
    nothing else is in it."""
    folder = Path(folder)
    for pattern in _PATTERNS:
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)
    CheckpointStore(folder).discard()


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name; a tensor
    shared under several names counts once)."""
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.numel() and t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        hash_tensor(digest, name, t)
    return digest.hexdigest()


def hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Feed ``name``, dtype, shape and bytes of ``tensor`` to ``digest`` (a hashlib object)."""
    t = tensor.detach()
    digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _block_record(block: nn.Module, reports: list[LayerReport]) -> dict[str, Any]:
    layers = {
        name: {"weight": m.weight_meta, **m.addon_meta()}
        for name, m in block.named_modules()
        if isinstance(m, QuantLinear)
    }
    return {
        "layers": json.dumps(layers),
        "state": block.state_dict(),
        "reports": json.dumps([r.to_dict() for r in reports]),
    }


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """``key: saved -> now`` for each differing leaf of two nested dicts ('' if none)."""
    a, b = _flatten(saved), _flatten(now)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}" for k in keys)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value: Any) -> str:
    """``repr`` of a setting, long strings (hashes) cut to 12 characters."""
    if isinstance(value, str) and len(value) > 16:
        value = value[:12] + "..."
    return repr(value)


def _block_file(index: int) -> str:
    return f"block_{index:04d}.pt"


def _inputs_file(index: int) -> str:
    return f"inputs_{index:04d}.pt"


def _warn_threads(saved: int) -> None:
    """Results are bit-exact for one thread count: say when a resume runs with another."""
    if saved != torch.get_num_threads():
        log.warning(
            "checkpoint written with %d threads, resuming with %d: the result may differ in the "
            "last bits from an uninterrupted run",
            saved,
            torch.get_num_threads(),
        )


def _maybe_kill(finished: int) -> None:
    """SIGKILL this process when ``$LOWBIT_KILL_AFTER_BLOCKS`` equals ``finished`` (tests)."""
    if os.environ.get(KILL_AFTER_ENV) == str(finished):
        os.kill(os.getpid(), signal.SIGKILL)
