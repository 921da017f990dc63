"""The training loop of LR-QAT and full QAT: next-token loss, AdamW, warm-up then linear decay,
gradient clipping, gradient checkpointing over the decoder blocks, resumable checkpoints.

A checkpoint holds everything the rest of the run depends on: the trainable tensors, the
optimizer and scheduler states, the global RNG state, the losses so far and the data position
(the step; batch ``k`` is rows ``k*B .. (k+1)*B`` of a batch tensor drawn once from the seed).
Resuming from step ``k`` therefore continues to bit-identical trainables. The checkpoint also
records the settings, the training text's hash and a hash of the starting weights, and resuming
with different ones is an error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.memory import peak_rss_mb, reset_peak_rss
from lowbit.nn.fake_quant_linear import FakeQuantLinear

log = logging.getLogger(__name__)

KIND = "train"  # block-wise PTQ checkpoints in the same folder say "ptq"
STATE_VERSION = 1
# settings that may change between an interrupted run and its resumption
RESUME_NEUTRAL = ("checkpoint_every",)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): ``(step + 1) / warmup``
    during the warm-up, then linear decay ``(total - step) / (total - warmup)``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@contextlib.contextmanager
def checkpointed(blocks: nn.ModuleList) -> Iterator[None]:
    """Recompute each block's activations in the backward pass instead of keeping them."""
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def start_fingerprint(layers: dict[str, FakeQuantLinear]) -> str:
    """sha256 over every tensor of the layers before training (identifies the starting point:
    model, initialisation and downcast)."""
    h = hashlib.sha256()
    for name, layer in layers.items():
        for key, t in layer.state_dict().items():
            h.update(f"{name}.{key}".encode())
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _param_groups(layers: dict[str, FakeQuantLinear], lrs: dict[str, float]) -> list[dict]:
    groups: dict[str, list[nn.Parameter]] = {}
    for layer in layers.values():
        for kind, params in layer.param_groups().items():
            groups.setdefault(kind, []).extend(params)
    return [{"params": ps, "lr": lrs[kind], "name": kind} for kind, ps in groups.items()]


def _nbytes(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def state_memory_mb(model: nn.Module, layers, optimizer) -> dict[str, float]:
    """What the training state holds, MiB: frozen quantized-weight storage, trainables, their
    gradients, optimizer moments, and the rest of the model (embeddings, norms, head)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_linears = [t for layer in layers.values() for t in layer.frozen_tensors()]
    opt_state = [
        v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    ]
    return {
        "frozen_linear_weights": _nbytes(frozen_linears),
        "trainables": _nbytes(trainable),
        "gradients": _nbytes(trainable),
        "optimizer": _nbytes(opt_state),
        "rest_of_model": _nbytes(p for p in model.parameters() if not p.requires_grad),
    }


def _check_resumable(saved: dict, meta: dict, where: str) -> None:
    if saved.get("kind") != KIND:
        raise LowbitError(
            f"{where} holds the checkpoint of another kind of run (block-wise PTQ); resume it "
            "with the same method, or remove the folder to start over"
        )
    if saved.get("version") != STATE_VERSION:
        raise LowbitError(f"checkpoint {where} has another format version; remove it to start over")
    diff = sorted(
        k
        for k in set(meta["config"]) | set(saved["meta"]["config"])
        if meta["config"].get(k) != saved["meta"]["config"].get(k)
    )
    if diff:
        was = ", ".join(f"{k}={saved['meta']['config'].get(k)!r}" for k in diff)
        raise LowbitError(
            f"checkpoint {where} was written with {was}; resume with the same settings, or "
            "remove it to start over"
        )
    for key, what in (("data_sha256", "training text"), ("start_sha256", "starting weights")):
        if saved["meta"][key] != meta[key]:
            raise LowbitError(
                f"checkpoint {where} was written for other {what} (another model, corpus or "
                "initialisation); resume the same run, or remove it to start over"
            )


def train(
    model: nn.Module,
    blocks: nn.ModuleList,
    layers: dict[str, FakeQuantLinear],
    batches: torch.Tensor,
    config: Any,
    meta: dict[str, Any],
    store: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the trainables of ``layers`` in place for ``config.steps`` steps.

    Args:
        batches: int64 ``[steps * batch_size, seqlen]`` token windows, consumed in order.
        config: the method config (``steps``, ``batch_size``, learning rates, ``warmup_ratio``,
            ``adam_beta2``, ``weight_decay``, ``max_grad_norm``, ``grad_checkpointing``,
            ``checkpoint_every``, ``train_seed``, ``train_dtype``).
        meta: ``{"config": settings dict, "data_sha256", "start_sha256"}`` stored with every
            checkpoint and compared when resuming.
        store: a :class:`~lowbit.engine.model_context.CheckpointStore` or ``None``.
    Returns:
        Run facts: losses per step, seconds per step, tokens/s, peak memory, state sizes.
    """
    steps, bsz = config.steps, config.batch_size
    optimizer, scheduler = _optimizer(layers, config)
    trainables = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = store.load() if store is not None else None
    start, losses = 0, []
    if saved is not None:
        _check_resumable(saved, meta, str(store.folder))
        start, losses = _restore(saved, trainables, optimizer, scheduler)
        log.info("resuming from step %d of %d", start, steps)
    else:
        torch.manual_seed(config.train_seed)

    def snapshot(step: int) -> dict[str, Any]:
        return {
            "kind": KIND,
            "version": STATE_VERSION,
            "step": step,
            "meta": meta,
            "trainables": {n: p.detach() for n, p in trainables.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "threads": torch.get_num_threads(),
            "losses": losses,
        }

    times: list[float] = []
    cpu_times: list[float] = []  # CPU seconds of all threads: comparable on a busy machine
    params = list(trainables.values())
    measured = reset_peak_rss()
    was_training = model.training
    model.train()
    bar = tqdm(total=steps, initial=start, disable=not progress, unit="step", desc="train")
    ctx = checkpointed(blocks) if config.grad_checkpointing else contextlib.nullcontext()
    try:
        with ctx:
            for step in range(start, steps):
                t0, c0 = time.perf_counter(), time.process_time()
                batch = batches[step * bsz : (step + 1) * bsz].to(params[0].device)
                with _precision(config.train_dtype, batch.device.type):
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                losses.append(loss.detach().item())
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{batch.numel() / times[-1]:.0f}")
                bar.update(1)
                if store is not None and _due(step + 1, config.checkpoint_every, steps):
                    store.save(snapshot(step + 1))
                    log.info("step %d/%d loss %.4f: checkpoint saved", step + 1, steps, losses[-1])
    finally:
        bar.close()
        model.train(was_training)
    timing = {"wall": times, "cpu": cpu_times, "rss_reset": measured}
    return _stats(model, layers, optimizer, config, batches, start, losses, timing)


def _optimizer(layers: dict[str, FakeQuantLinear], config: Any) -> tuple:
    """AdamW over the layers' parameter groups and its warm-up + linear-decay schedule."""
    lrs = {"lowrank": config.lr, "weights": config.weight_lr, "scales": config.scale_lr}
    optimizer = torch.optim.AdamW(
        _param_groups(layers, lrs),
        betas=(0.9, config.adam_beta2),
        eps=1e-8,
        weight_decay=config.weight_decay,
    )
    warmup = round(config.warmup_ratio * config.steps)
    schedule = functools.partial(lr_factor, warmup=warmup, total=config.steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _restore(saved: dict, trainables: dict, optimizer, scheduler) -> tuple[int, list[float]]:
    """Load a checkpoint's trainables, optimizer, scheduler and RNG; (next step, losses)."""
    with torch.no_grad():
        for name, p in trainables.items():
            p.copy_(saved["trainables"][name])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    if saved["threads"] != torch.get_num_threads():  # float sums depend on the split
        log.warning(
            "checkpoint written with %d threads, resuming with %d: the result may differ in "
            "the last bits from an uninterrupted run",
            saved["threads"],
            torch.get_num_threads(),
        )
    return saved["step"], list(saved["losses"])


def _mean_after_first(xs: list[float]) -> float | None:
    """Mean without the first value (it includes one-off setup) when there are others."""
    xs = xs[1:] if len(xs) > 1 else xs
    return sum(xs) / len(xs) if xs else None


def _precision(dtype: str, device: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16 matmuls for ``bf16``; nothing for ``fp32``."""
    if dtype == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _due(done: int, every: int, total: int) -> bool:
    """Checkpoint after ``done`` steps: every ``every`` steps and at the end (0 = never)."""
    return every > 0 and (done % every == 0 or done == total)


def _stats(model, layers, optimizer, config, batches, start, losses, timing) -> dict:
    tokens_per_step = batches.shape[0] // config.steps * batches.shape[1]
    sec = _mean_after_first(timing["wall"])
    head, tail = losses[:10], losses[-10:]
    return {
        "steps": config.steps,
        "resumed_from_step": start,
        "batch_size": config.batch_size,
        "seqlen": int(batches.shape[1]),
        "tokens": config.steps * tokens_per_step,
        "seconds": sum(timing["wall"]),
        "sec_per_step": sec,
        "cpu_sec_per_step": _mean_after_first(timing["cpu"]),
        "tokens_per_s": tokens_per_step / sec if sec else None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_scope": "training only" if timing["rss_reset"] else "whole process",
        "state_mb": state_memory_mb(model, layers, optimizer),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "loss_first10": sum(head) / len(head) if head else None,
        "loss_last10": sum(tail) / len(tail) if tail else None,
        "losses": losses,
    }
