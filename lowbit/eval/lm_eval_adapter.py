"""lm-evaluation-harness adapter: any lowbit model evaluated as an lm-eval ``LM``, in process.

``LowbitLM`` wraps a causal LM and its tokenizer (the ``.model``/``.tokenizer``/``.add_bos``
of a ``LoadedModel``: a bundled model, a HF folder or a quantized lowbit DIR, simulated
activation quantization included) and answers lm-eval's three request types:

* ``loglikelihood`` (context, continuation): sum of the continuation tokens' log-probabilities and
  whether each of them is the argmax (``is_greedy``). Context and continuation are tokenized
  together and split as lm-eval's ``TemplateLM`` does; requests run longest first in batches of
  ``batch_size``, right-padded and without an attention mask, so a row's logits are those of the
  row alone (causal attention never looks right). Only the positions that predict continuation
  tokens are projected to the vocabulary when the model accepts ``logits_to_keep``; the
  log-softmax is done in fp32. Over-long inputs keep their last ``max_length`` tokens.
* ``loglikelihood_rolling`` (text): the whole text scored in disjoint windows of ``max_length``
  tokens, the first predicted from the prefix token (lm-eval's rolling-window protocol).
* ``generate_until`` (context, gen_kwargs): greedy decoding with ``model.generate``, left-padded
  batches, cut at the first ``until`` string.

BOS: with ``add_bos`` (``LoadedModel.add_bos``, from the tokenizer: Gemma yes, SmolLM2 no)
every sequence starts with the BOS token, and a request with an empty context is conditioned
on BOS; without it, on EOS (lm-eval's convention).

``import lowbit.eval.lm_eval_adapter`` registers the model name ``lowbit``, so
``lm_eval.simple_evaluate(model="lowbit", model_args="pretrained=smollm2-135m")`` works too;
``run_tasks`` is what ``lowbit eval --tasks`` calls.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval._forward import eval_mode, model_device

log = logging.getLogger(__name__)

#: Context cap when the model's config allows more (a CPU cannot afford 8k-token windows).
DEFAULT_MAX_LENGTH = 2048
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


@register_model("lowbit")
class LowbitLM(TemplateLM):
    """An lm-eval language model over a lowbit (or any HF causal) model.

    Args:
        pretrained: a bundled name, HF folder or lowbit DIR, loaded with
            ``lowbit.loading.load_model`` when ``model`` is not given (the form lm-eval's
            ``model_args`` uses).
        model, tokenizer: an already loaded causal LM (``nn.Module`` returning ``.logits``
            ``[B, L, V]``) and its HF tokenizer.
        add_bos: start every sequence with BOS (default: the block table's ``add_bos`` when
            loading ``pretrained``, else ``False``).
        batch_size: requests per forward pass (``"auto"`` means the default, 8).
        max_length: longest input in tokens (default: the config's ``max_position_embeddings``
            capped at 2048).
        device: move the model there first (default: leave it where it is).
        share_prefix: run a context shared by several requests once, with a KV cache (the
            choices of a multiple-choice question); ``False`` runs every request in full.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        add_bos: bool | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        device: str | None = None,
        share_prefix: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        unused = {k: v for k, v in kwargs.items() if v is not None and k != "max_batch_size"}
        if unused:
            raise LowbitError(f"lowbit lm-eval model got unknown arguments: {sorted(unused)}")
        if model is None:
            if pretrained is None:
                raise LowbitError("LowbitLM needs a model (model=, tokenizer=) or pretrained=SPEC")
            # Lazy: only the lm-eval string form needs the loader (a layer below eval/).
            from lowbit.loading import load_model

            loaded = load_model(str(pretrained))
            model, tokenizer = loaded.model, loaded.tokenizer
            add_bos = loaded.add_bos if add_bos is None else add_bos
        if tokenizer is None:
            raise LowbitError("LowbitLM needs the model's tokenizer")
        if device is not None:
            model = model.to(device)
        self.model = model
        self.tokenizer = tokenizer
        self.add_bos = bool(add_bos) if add_bos is not None else False
        self.batch_size = _parse_batch_size(batch_size)
        self.share_prefix = _parse_bool(share_prefix)
        self.max_length = int(max_length) if max_length else _default_max_length(model)
        if self.add_bos and getattr(tokenizer, "bos_token_id", None) is None:
            raise LowbitError("add_bos was requested but the tokenizer has no BOS token")
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise LowbitError("the tokenizer has no EOS token; lm-eval needs one to end text")
        params = inspect.signature(model.forward).parameters
        self._keep_arg = "logits_to_keep" in params
        # transformers 5 renamed past_key_values -> cache and dropped cache_position.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._cache_position_arg = "cache_position" in params

    @classmethod
    def from_loaded(cls, loaded: Any, **kwargs: Any) -> LowbitLM:
        """Wrap a ``lowbit.loading.LoadedModel`` (its model, tokenizer and ``add_bos``)."""
        return cls(
            model=loaded.model, tokenizer=loaded.tokenizer, add_bos=loaded.add_bos, **kwargs
        )

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        return int(self.tokenizer.bos_token_id) if self.add_bos else self.eot_token_id

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Token ids of ``string``; BOS first when ``add_bos`` and ``add_special_tokens`` is not
        ``False`` (a string that already starts with BOS keeps just the one)."""
        ids = list(self.tokenizer(string, add_special_tokens=False)["input_ids"])
        if self.add_bos and add_special_tokens is not False:
            if not ids or ids[0] != self.prefix_token_id:
                ids = [self.prefix_token_id, *ids]
        return ids

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    # ------------------------------------------------------------ likelihoods
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), is_greedy)`` per ``(key, context_ids, cont_ids)``.

        ``context_ids`` must not be empty when ``cont_ids`` is not (the first continuation token
        needs a position to be predicted from). Requests sharing their context (the choices of a
        multiple-choice question) run the context once when ``share_prefix`` is set.
        """
        inputs = []
        for _, ctx, cont in requests:
            whole = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            if cont and len(whole) < 2:
                raise LowbitError("a loglikelihood request needs at least one context token")
            inputs.append((whole[:-1], list(cont)[-len(whole) + 1 :] if cont else []))
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (inp, cont) in enumerate(inputs):
            groups.setdefault(tuple(inp[: len(inp) - len(cont) + 1]), []).append(i)
        shared: list[list[int]] = []
        single: list[int] = []
        for key, members in groups.items():
            if self.share_prefix and len(members) > 1 and len(key) > 1:
                shared.append(members)
            else:
                single.extend(members)
        single.sort(key=lambda i: -len(inputs[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(inputs)
        bar = tqdm(total=len(inputs), desc="loglikelihood", disable=disable_tqdm, leave=False)

        def done(chunk: list[int], answers: list[tuple[float, bool]]) -> None:
            for i, answer in zip(chunk, answers, strict=True):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(chunk))

        with eval_mode(self.model):
            for members in shared:
                done(members, self._score_shared([inputs[i] for i in members]))
            for start in range(0, len(single), self.batch_size):
                chunk = single[start : start + self.batch_size]
                done(chunk, self._score_batch([inputs[i] for i in chunk]))
        bar.close()
        return results  # type: ignore[return-value]

    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Score right-padded ``(input_ids, continuation)`` rows in one forward pass."""
        width = max(len(inp) for inp, _ in rows)
        pad = self.eot_token_id
        batch = torch.tensor([inp + [pad] * (width - len(inp)) for inp, _ in rows])
        # Positions predicting continuation tokens: [len(inp) - len(cont), len(inp)) per row.
        lo = min((len(inp) - len(cont) for inp, cont in rows if cont), default=0)
        extra = {}
        if self._keep_arg:
            extra["logits_to_keep"] = torch.arange(lo, width, device=self.device)
        out = self.model(input_ids=batch.to(self.device), use_cache=False, **extra)
        logits = out.logits if hasattr(out, "logits") else out[0]
        offset = lo if self._keep_arg else 0
        return [
            _score_row(logits[r], len(inp) - len(cont) - offset, cont)
            for r, (inp, cont) in enumerate(rows)
        ]

    def _score_shared(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Rows with one context: the context but its last token runs once (``[1, P]``) with a
        KV cache; the continuations, each led by the last context token, run as a right-padded
        batch ``[n, w]`` on copies of that cache (positions ``P..P+w-1``)."""
        inp0, cont0 = rows[0]
        n_prefix = len(inp0) - len(cont0)
        prefix = torch.tensor([inp0[:n_prefix]], device=self.device)
        out = self.model(input_ids=prefix, use_cache=True, **self._keep_last())
        answers = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            cache = copy.deepcopy(_output_cache(out))
            cache.batch_repeat_interleave(len(chunk))
            suffixes = [inp[n_prefix:] for inp, _ in chunk]
            width = max(len(x) for x in suffixes)
            pad = self.eot_token_id
            ids = torch.tensor([x + [pad] * (width - len(x)) for x in suffixes], device=self.device)
            positions = torch.arange(n_prefix, n_prefix + width, device=self.device)
            kwargs = {self._cache_arg: cache}
            if self._cache_position_arg:
                kwargs["cache_position"] = positions
            logits = self.model(
                input_ids=ids,
                use_cache=True,
                position_ids=positions.expand(len(chunk), width),
                **kwargs,
            ).logits
            answers.extend(_score_row(logits[r], 0, cont) for r, (_, cont) in enumerate(chunk))
        return answers

    def _keep_last(self) -> dict[str, int]:
        return {"logits_to_keep": 1} if self._keep_arg else {}

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of ``max_length`` tokens."""
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm, leave=False):
            (text,) = req.args
            ids = self.tok_encode(text, add_special_tokens=False)
            windows = [
                (None, *lm_utils.make_disjoint_window(w))
                for w in lm_utils.get_rolling_token_windows(
                    token_list=ids,
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(lp for lp, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # -------------------------------------------------------------- generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first of its ``until`` strings."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm, leave=False)
        with eval_mode(self.model):
            for members in groups.values():
                kwargs = dict(requests[members[0]].args[1])
                until, max_new, gen = self._gen_settings(kwargs)
                members = sorted(members, key=lambda i: -len(requests[i].args[0]))
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start : start + self.batch_size]
                    texts = self._generate([requests[i].args[0] for i in chunk], max_new, gen)
                    for i, text in zip(chunk, texts, strict=True):
                        for stop in until:
                            if stop:
                                text = text.split(stop)[0]
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _gen_settings(self, kwargs: dict[str, Any]) -> tuple[list[str], int, dict[str, Any]]:
        until = kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        eos_text = self.tok_decode([self.eot_token_id])
        until = [*until, eos_text] if eos_text not in until else list(until)
        max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        if kwargs.pop("do_sample", False) or kwargs.get("temperature", 0.0):
            log.warning("lowbit's lm-eval adapter decodes greedily; sampling settings ignored")
        for key in ("temperature", "top_p", "top_k"):
            kwargs.pop(key, None)
        return until, max_new, kwargs

    def _generate(self, contexts: list[str], max_new: int, gen: dict[str, Any]) -> list[str]:
        keep = max(1, self.max_length - max_new)
        encoded = [self.tok_encode(c)[-keep:] for c in contexts]
        width = max(len(e) for e in encoded)
        pad = self.eot_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=self.device
        )
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad,
            **gen,
        )
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]

    def get_model_info(self) -> dict[str, Any]:
        return {"lowbit_add_bos": self.add_bos, "lowbit_max_length": self.max_length}


def _score_row(logits: torch.Tensor, first: int, cont: list[int]) -> tuple[float, bool]:
    """``(sum of log p(cont), all greedy)`` from ``logits[first : first + len(cont)]`` ``[.., V]``
    (log-softmax in fp32, sum in float64); an empty continuation scores ``(0.0, True)``."""
    if not cont:
        return 0.0, True
    row = F.log_softmax(logits[first : first + len(cont)].float(), dim=-1)
    target = torch.tensor(cont, device=row.device)
    logprob = row.gather(-1, target[:, None]).sum(dtype=torch.float64).item()
    return logprob, bool((row.argmax(-1) == target).all().item())


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _parse_batch_size(value: int | str | None) -> int:
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise LowbitError(f"batch_size must be at least 1, got {size}")
    return size


def _parse_bool(value: bool | str) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _default_max_length(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    return int(min(limit, DEFAULT_MAX_LENGTH))


# ----------------------------------------------------------------- running tasks
def task_manager(task_names: Sequence[str], include_path: str | Path | None = None) -> Any:
    """An lm-eval ``TaskManager`` that knows lowbit's local tasks (built on first use).

    lm-eval's own task index (slow to build: ~10 s) is included only when a requested task is
    not a local one.
    """
    from lm_eval.tasks import TaskManager

    from lowbit.eval.local_tasks import LOCAL_TASKS, local_tasks_dir

    paths = [str(local_tasks_dir())]
    if include_path is not None:
        paths.append(str(include_path))
    defaults = any(name not in LOCAL_TASKS for name in task_names) or include_path is not None
    return TaskManager(include_path=paths, include_defaults=defaults)


def load_tasks(manager: Any, task_names: Sequence[str]) -> list[Any]:
    """Build each task (loading its data) or raise a ``LowbitError`` that names what is missing.

    Returns lm-eval ``Task`` objects (or names, for groups and tags) for ``simple_evaluate``.
    Never downloads: the Hugging Face hub and ``datasets`` are forced offline for the call.
    """
    built: list[Any] = []
    with _offline(), _no_dataset_progress_bars():
        for name in task_names:
            if name not in manager.all_tasks:
                close = difflib.get_close_matches(name, manager.all_tasks, n=3)
                hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
                raise LowbitError(f"unknown lm-eval task '{name}'{hint}")
            try:
                loaded = manager.load([name])
            except (OSError, ValueError, KeyError) as exc:  # ConnectionError, DatasetNotFound
                raise LowbitError(_missing_data_message(manager, name, exc)) from exc
            if loaded["groups"]:
                built.append(name)
            else:
                built.extend(loaded["tasks"].values())
    return built


def _missing_data_message(manager: Any, name: str, exc: Exception) -> str:
    entry = manager.task_index.get(name)
    dataset = None
    if entry is not None and getattr(entry, "yaml_path", None):
        try:
            from lm_eval.tasks._yaml_loader import load_yaml

            config = load_yaml(entry.yaml_path, resolve_func=False)
            dataset = config.get("dataset_path")
            if config.get("dataset_name"):
                dataset = f"{dataset} ({config['dataset_name']})"
        except (OSError, ValueError, ImportError, TypeError):
            dataset = None
    what = f"its dataset {dataset}" if dataset else "its data"
    reason = " ".join(str(exc).split())[:160]
    return (
        f"lm-eval task '{name}' cannot run: {what} is not available offline ({reason}); "
        "lowbit never downloads: put the dataset in the Hugging Face datasets cache first, "
        "or use the local tasks lowbit_cloze_austen, lowbit_nextsent_austen"
    )


@dataclass(frozen=True)
class PreparedTasks:
    """Tasks checked and built (their data loaded) before any model is: see ``prepare_tasks``."""

    names: tuple[str, ...]
    manager: Any
    tasks: tuple[Any, ...]


def prepare_tasks(
    task_names: Sequence[str] | str, include_path: str | Path | None = None
) -> PreparedTasks:
    """Resolve and build lm-eval tasks (``"a,b"`` or a list); ``LowbitError`` names any task
    that is unknown or whose data is not on this machine."""
    if isinstance(task_names, str):
        task_names = task_names.split(",")
    names = tuple(dict.fromkeys(t.strip() for t in task_names if t.strip()))
    if not names:
        raise LowbitError("no lm-eval task named; give --tasks a,b,...")
    manager = task_manager(names, include_path)
    return PreparedTasks(names, manager, tuple(load_tasks(manager, names)))


def run_tasks(
    lm: LowbitLM,
    tasks: PreparedTasks | Sequence[str] | str,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 1000,
) -> dict[str, Any]:
    """Run lm-eval tasks on ``lm`` with ``lm_eval.simple_evaluate`` (offline, no sample logs).

    ``limit``: examples per task (a fraction when below 1), lm-eval's ``--limit``: the first
    ``limit`` documents of each task. ``bootstrap_iters``: bootstrap resamples for the stderr of
    metrics that have no closed form (perplexity); ``acc`` stderr is the closed-form
    ``sqrt(p(1-p)/(n-1))``. Returns ``{"results": {task: {metric: value, metric + "_stderr":
    value}}, "rows": [(task, metric, value, stderr)], "n_samples": {task: n}, "versions",
    "limit", "num_fewshot"}``; a value is ``None`` where lm-eval gives none (``"N/A"``).
    """
    import lm_eval

    if not isinstance(tasks, PreparedTasks):
        tasks = prepare_tasks(tasks)
    with _offline():
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks.tasks),
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters,
            task_manager=tasks.manager,
            log_samples=False,
        )
    return summarize(out, limit, num_fewshot)


def summarize(out: dict[str, Any], limit: Any, num_fewshot: int | None) -> dict[str, Any]:
    """The JSON-safe part of ``simple_evaluate``'s answer, plus a flat list of table rows."""
    results: dict[str, dict[str, float | None]] = {}
    rows = []
    for task, metrics in out["results"].items():
        clean: dict[str, float | None] = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            metric, _filter = key.split(",", 1)
            clean[metric] = _number(value)
        results[task] = clean
        for metric, value in clean.items():
            if not metric.endswith("_stderr"):
                rows.append((task, metric, value, clean.get(f"{metric}_stderr")))
    n_samples = {
        t: int(v.get("effective", v.get("original", 0))) if isinstance(v, dict) else v
        for t, v in out.get("n-samples", {}).items()
    }
    return {
        "results": results,
        "rows": rows,
        "n_samples": n_samples,
        "versions": {k: _number(v) for k, v in out.get("versions", {}).items()},
        "limit": limit,
        "num_fewshot": num_fewshot,
    }


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    return None


@contextmanager
def _no_dataset_progress_bars() -> Iterator[None]:
    """Silence ``datasets``' own bars ("Generating test split") while tasks are built: the first
    build of a local task's data printed one on stderr ahead of any one-line error, so the
    error's shape depended on whether an earlier call had built the data already."""
    try:
        import datasets
    except ImportError:
        yield
        return
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


class _offline:
    """Force ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` inside the block, restore afterwards."""

    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in self.keys}
        for k in self.keys:
            os.environ[k] = "1"
        self.flags = []
        for module, attr in (
            ("datasets.config", "HF_DATASETS_OFFLINE"),
            ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ):
            try:
                config = importlib.import_module(module)
            except ImportError:
                continue
            if hasattr(config, attr):
                self.flags.append((config, attr, getattr(config, attr)))
                setattr(config, attr, True)

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for config, attr, value in self.flags:
            setattr(config, attr, value)
