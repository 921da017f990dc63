"""What a whole-model method (``apply_model``, e.g. end-to-end training) sees of the model.

The engine runs block-wise methods itself; a whole-model method gets the model and a few
services built by the caller (:func:`lowbit.api.quantize`): running a registered block-wise
method first (to start from a PTQ result), token windows of a corpus, and a folder for resumable
state. Nothing here knows a particular method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.atomic import atomic_file
from lowbit.core.config import MethodConfig
from lowbit.core.report import LayerReport
from lowbit.errors import LowbitError
from lowbit.models.arch import BlockTable, get_blocks


class CheckpointStore:
    """Resumable state of one run in ``folder``: a single ``state.pt`` replaced atomically.

    ``load()`` gives the saved state when ``resume`` is set (``None`` when there is none yet)
    and refuses to silently restart over an earlier run's state when it is not.
    """

    FILE = "state.pt"

    def __init__(self, folder: str | Path, resume: bool = False) -> None:
        self.folder = Path(folder)
        self.resume = resume

    @property
    def path(self) -> Path:
        return self.folder / self.FILE

    def load(self) -> dict[str, Any] | None:
        """The last saved state, or ``None`` (nothing saved yet)."""
        if not self.path.is_file():
            return None
        if not self.resume:
            raise LowbitError(
                f"{self.folder} holds the checkpoint of an earlier run; pass --resume to continue "
                "it, or remove the folder to start over"
            )
        return torch.load(self.path, weights_only=True)

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (tensors, numbers, strings, lists, dicts): old or new, never half."""
        with atomic_file(self.path) as tmp:
            torch.save(state, tmp)

    def discard(self) -> None:
        """Remove the saved state, and the folder if nothing else is in it (the run finished
        and its result is saved)."""
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()


@dataclass
class ModelContext:
    """A whole model under quantization.

    Attributes:
        model: the ``*ForCausalLM`` module (methods replace its linears in place).
        table: the architecture's block table; ``blocks`` gives the decoder blocks.
        add_bos: windows start with BOS (see ``LoadedModel.add_bos``).
        ptq: ``ptq(config)`` runs the block-wise method registered for ``config`` on the
            calibration data (in place) and returns its per-layer reports.
        windows: ``windows(corpus, n, seqlen, seed)`` -> (``[n, seqlen]`` int64 random token
            windows of a corpus, drawn as calibration windows are; sha256 of the corpus text).
        checkpoints: where resumable state goes, or ``None`` (no checkpoints).
        progress: show progress bars.
        device: where the method computes; the model is in CPU memory (a training method
            moves it there for training and back, :meth:`on_device`).
    """

    model: nn.Module
    table: BlockTable
    add_bos: bool
    ptq: Callable[[MethodConfig], list[LayerReport]]
    windows: Callable[[str, int, int, int], tuple[torch.Tensor, str]]
    checkpoints: CheckpointStore | None = None
    progress: bool = True
    device: torch.device = torch.device("cpu")

    @contextlib.contextmanager
    def on_device(self) -> Iterator[nn.Module]:
        """The model on :attr:`device` while the context lasts, back in CPU memory after."""
        self.model.to(self.device)
        try:
            yield self.model
        finally:
            self.model.to("cpu")

    @property
    def blocks(self) -> nn.ModuleList:
        return get_blocks(self.model, self.table)
