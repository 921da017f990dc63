"""Greedy batch-1 decoding with a static KV cache and an optionally compiled decode step.

Hugging Face ``generate`` spends milliseconds per token on its own bookkeeping; this loop does
only what greedy decoding needs: one prefill forward that fills a
:class:`transformers.StaticCache` (and computes logits for the last position only), then one
forward per token. With ``compile`` the decode step (forward + argmax) goes through
``torch.compile`` once; the static cache keeps its shapes fixed, so it compiles once and
never again (positions come from the cache's own counter tensor). When compilation fails the
decoder says why and runs eagerly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeConfig:
    """Attributes:
    max_new_tokens: tokens to generate (the first comes from the prefill).
    compile: compile the decode step with ``torch.compile``.
    stop_at_eos: stop at the tokenizer's end-of-sequence token (benchmarks turn it off).
    """

    max_new_tokens: int = 40
    compile: bool = False
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Decoded:
    """One generation: ``tokens`` int64 ``[1, P + n]`` (prompt then ``n`` new tokens), the
    prefill's seconds and the seconds of each later decode step (``n - 1`` of them)."""

    tokens: torch.Tensor
    prompt_len: int
    prefill_seconds: float
    step_seconds: list[float] = field(default_factory=list)
    compiled: bool = False

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[0, self.prompt_len :]

    @property
    def decode_tokens_per_second(self) -> float:
        total = sum(self.step_seconds)
        return len(self.step_seconds) / total if total > 0 else float("nan")


class Decoder:
    """Greedy decoding of ``model`` at batch 1 for sequences up to ``max_len`` tokens.

    Args:
        model: a Hugging Face causal LM in eval mode (any dtype; kernels prepared already).
        max_len: prompt plus new tokens; the static cache holds this many positions.
        compile: compile the decode step (see :meth:`warm_up`).
    """

    def __init__(self, model: nn.Module, max_len: int, compile: bool = False) -> None:
        from transformers import StaticCache

        self.model = model
        self.max_len = max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.compiled = False
        self.compile_note: str | None = None
        self.compile_seconds = 0.0
        self._step = self._eager_step
        if compile:
            self._step = torch.compile(self._eager_step, dynamic=False)
            self.compiled = True

    def _eager_step(self, token: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=token, cache=self.cache, use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Fill the cache with ``ids`` ``[1, P]``; returns the next token ``[1, 1]``."""
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append ``token`` ``[1, 1]`` to the cache; returns the next token ``[1, 1]``."""
        return self._step(token)

    @torch.inference_mode()
    def warm_up(self, ids: torch.Tensor, steps: int = 3) -> None:
        """Run a prefill and ``steps`` decode steps and reset the cache. With ``compile`` this
        is where compilation happens (timed in ``compile_seconds``); if it fails the decoder
        falls back to eager steps and ``compile_note`` says why."""
        start = time.perf_counter()
        try:
            self._run(ids, steps)
        except Exception as exc:  # any torch.compile backend failure: fall back, say why
            if not self.compiled:
                raise
            self.compile_note = f"torch.compile failed, decoding eagerly: {exc!s:.300}"
            log.warning(self.compile_note)
            self._step, self.compiled = self._eager_step, False
            self.cache.reset()
            self._run(ids, steps)
        self.compile_seconds = time.perf_counter() - start if self.compiled else 0.0
        self.cache.reset()

    def _run(self, ids: torch.Tensor, steps: int) -> None:
        token = self.prefill(ids)
        for _ in range(steps):
            token = self.step(token)

    @torch.inference_mode()
    def generate(
        self, ids: torch.Tensor, max_new_tokens: int, eos: frozenset[int] | set[int] = frozenset()
    ) -> Decoded:
        """Greedy continuation of ``ids`` ``[1, P]`` by up to ``max_new_tokens`` tokens (stops
        after a token in ``eos``). Returns a :class:`Decoded`; the cache is reset first."""
        prompt_len = ids.shape[1]
        if prompt_len + max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt ({prompt_len}) + new tokens ({max_new_tokens}) exceed the cache "
                f"({self.max_len}); build the Decoder with a larger max_len"
            )
        self.cache.reset()
        start = time.perf_counter()
        token = self.prefill(ids)
        result = Decoded(ids, prompt_len, time.perf_counter() - start, compiled=self.compiled)
        out = [token]
        while len(out) < max_new_tokens and int(token) not in eos:
            start = time.perf_counter()
            token = self.step(token)
            result.step_seconds.append(time.perf_counter() - start)
            out.append(token)
        result.tokens = torch.cat([ids, *out], dim=1)
        return result


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """End-of-sequence token ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def greedy_generate(
    model: nn.Module, tokenizer, prompt: str, config: DecodeConfig
) -> tuple[str, Decoded]:
    """Decode ``prompt`` greedily with a static cache; returns (text incl. prompt, timings)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    decoder = Decoder(model, ids.shape[1] + config.max_new_tokens, config.compile)
    if config.compile:
        decoder.warm_up(ids)
    eos = eos_ids(model, tokenizer) if config.stop_at_eos else set()
    result = decoder.generate(ids, config.max_new_tokens, eos)
    return tokenizer.decode(result.tokens[0], skip_special_tokens=True), result
