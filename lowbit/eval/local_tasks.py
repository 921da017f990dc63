"""Offline zero-shot tasks built from the bundled prose, as lm-eval task configs.

No zero-shot benchmark data (LAMBADA, HellaSwag, PIQA, ...) can be downloaded here, so lowbit
builds two small tasks of the same kinds from Jane Austen's *Pride and Prejudice* (the bundled
``austen-pp`` corpus: held out from the default calibration text, Emma). Both are deterministic:
the same corpus text, construction version and seed give byte-identical files.

Text preparation (both tasks): the novel is split into paragraphs at blank lines, from the first
``Chapter`` heading on; chapter headings are dropped; hard-wrapped lines are joined with single
spaces; the italic markers ``_word_`` of the source lose their underscores. A passage spanning
several paragraphs separates them with ``"\\n\\n"``.

``lowbit_cloze_austen`` (LAMBADA-style last-word prediction, ``output_type: loglikelihood``):
every paragraph whose last whitespace-separated token is a plain word (letters only, optionally
followed by closing punctuation and quotes such as ``wife."``) is a candidate. The target is that
word without the punctuation; the context is the ``cloze_context_words`` words before it (crossing
paragraph breaks, possibly starting mid-sentence), and candidates with fewer words before them
are skipped. Candidates are shuffled with ``random.Random(seed)`` and the first ``n_examples``
kept, so ``--limit N`` takes a random sample across the book. Metrics: ``acc`` (the target is
the model's greedy continuation, token by token: lm-eval's ``is_greedy``) and ``perplexity`` of
the target word.

``lowbit_nextsent_austen`` (multiple-choice next sentence, ``output_type: multiple_choice``):
paragraphs are split into sentences at ``.``/``!``/``?`` (plus closing quotes) followed by a
space and a capital letter or opening quote, except after ``Mr. Mrs. Dr. St.`` and similar
abbreviations. A question is a sentence that is not the first of its paragraph, has ``4..40``
words and ends in ``.``, ``!`` or ``?`` (maybe followed by a quote); its context is the
whole sentences before it that fit in ``nextsent_context_words`` words (crossing paragraph
breaks; a question whose previous sentence alone is longer is skipped). The three distractors
are sentences from paragraphs at least 20 paragraphs away, drawn with the seeded generator among
those with the same opening/closing quote marks as the true sentence and a word count within
``max(2, 25%)`` of it, so neither quotes nor length give the answer away. The true sentence's
position among the four choices is drawn with the same generator. Metrics: ``acc`` (highest
summed log-likelihood) and ``acc_norm`` (log-likelihood per byte); chance is 0.25.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from lowbit.atomic import atomic_dir
from lowbit.data.corpora import load_text, text_sha256
from lowbit.errors import LowbitError

#: Bump when the construction changes; it is part of the cache key and of each task's metadata.
CONSTRUCTION_VERSION = 1

CLOZE_TASK = "lowbit_cloze_austen"
NEXTSENT_TASK = "lowbit_nextsent_austen"
LOCAL_TASKS = (CLOZE_TASK, NEXTSENT_TASK)

_ABBREVIATIONS = frozenset({"Mr", "Mrs", "Dr", "St", "Messrs", "Col", "Capt", "Esq", "Rev", "Ld"})
_SENTENCE_END = re.compile(r"[.!?][\"')]*\s+(?=[\"'(]*[A-Z])")
_CLOZE_WORD = re.compile(r"^([A-Za-z]+)[.,;:!?\"')]+$|^([A-Za-z]+)$")
_TERMINAL = re.compile(r"[.!?][\"')]*$")
_CHAPTER = re.compile(r"^chapter\s+\w+\.?$", re.IGNORECASE)
_MIN_SENT_WORDS, _MAX_SENT_WORDS = 4, 40
_DISTRACTOR_MIN_DISTANCE = 20  # paragraphs
_N_DISTRACTORS = 3


@dataclass(frozen=True)
class LocalTaskSpec:
    """How the local tasks are built (every field is part of the cache key).

    Attributes:
        corpus: bundled corpus name the passages come from.
        n_examples: examples kept per task (``--limit`` picks the first of them).
        seed: seed of the ``random.Random`` that shuffles and draws distractors.
        cloze_context_words: words of context before the cloze target.
        nextsent_context_words: cap on the words of preceding sentences in a next-sentence
            question.
    """

    corpus: str = "austen-pp"
    n_examples: int = 1000
    seed: int = 1234
    cloze_context_words: int = 80
    nextsent_context_words: int = 60

    def __post_init__(self) -> None:
        if self.n_examples < 1:
            raise LowbitError(f"n_examples must be positive, got {self.n_examples}")
        if self.cloze_context_words < 1 or self.nextsent_context_words < 1:
            raise LowbitError("context word counts must be positive")


def paragraphs(text: str) -> list[str]:
    """Paragraphs of a bundled novel: from the first chapter heading on, headings dropped,
    hard-wrapped lines joined with single spaces, ``_`` italic markers removed."""
    blocks = [" ".join(b.split()) for b in re.split(r"\n\s*\n", text.replace("_", ""))]
    blocks = [b for b in blocks if b]
    first = next((i for i, b in enumerate(blocks) if _CHAPTER.match(b)), 0)
    return [b for b in blocks[first:] if not _CHAPTER.match(b)]


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph (see the module docstring for the rule)."""
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(paragraph):
        words = paragraph[start : m.start() + 1].split()
        if words and words[-1].rstrip(".").lstrip("\"'(") in _ABBREVIATIONS:
            continue
        out.append(paragraph[start : m.end()].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return out


def build_cloze(paras: list[str], spec: LocalTaskSpec) -> list[dict[str, Any]]:
    """Cloze documents ``{"context", "target", "paragraph"}`` (see the module docstring)."""
    words: list[str] = []
    para_of: list[int] = []
    for p, para in enumerate(paras):
        toks = para.split()
        words.extend(toks)
        para_of.extend([p] * len(toks))
    docs = []
    end = 0
    for p, para in enumerate(paras):
        end += len(para.split())
        m = _CLOZE_WORD.match(words[end - 1])
        start = end - 1 - spec.cloze_context_words
        if m is None or start < 0:
            continue
        docs.append(
            {
                "context": _join(words[start : end - 1], para_of[start : end - 1]),
                "target": m.group(1) or m.group(2),
                "paragraph": p,
            }
        )
    return _sample(docs, spec)


def build_nextsent(paras: list[str], spec: LocalTaskSpec) -> list[dict[str, Any]]:
    """Next-sentence documents ``{"context", "choices", "label", "paragraph"}``."""
    sents = [(p, s) for p, para in enumerate(paras) for s in split_sentences(para)]
    pool: dict[tuple[bool, bool], list[tuple[int, str, int]]] = {}
    for p, s in sents:
        if _usable(s):
            pool.setdefault(_quote_flags(s), []).append((p, s, len(s.split())))
    rng = random.Random(spec.seed)
    docs = []
    for i in range(1, len(sents)):
        p, true = sents[i]
        n_true = len(true.split())
        if sents[i - 1][0] != p or not _usable(true):
            continue
        context = _preceding(sents, i, spec.nextsent_context_words)
        if context is None:
            continue
        tol = max(2, round(0.25 * n_true))
        candidates = [
            s
            for q, s, n in pool[_quote_flags(true)]
            if abs(q - p) >= _DISTRACTOR_MIN_DISTANCE and abs(n - n_true) <= tol and s != true
        ]
        candidates = sorted(set(candidates))  # duplicates out; order independent of set hashing
        if len(candidates) < _N_DISTRACTORS:
            continue
        choices = rng.sample(candidates, _N_DISTRACTORS)
        label = rng.randrange(_N_DISTRACTORS + 1)
        choices.insert(label, true)
        docs.append({"context": context, "choices": choices, "label": label, "paragraph": p})
    return _sample(docs, spec)


def _usable(sentence: str) -> bool:
    """A complete sentence (ends in . ! or ?, maybe quoted) of 4..40 words."""
    n = len(sentence.split())
    return _MIN_SENT_WORDS <= n <= _MAX_SENT_WORDS and _TERMINAL.search(sentence) is not None


def _quote_flags(sentence: str) -> tuple[bool, bool]:
    return sentence.startswith(('"', "'")), sentence.rstrip(")").endswith(('"', "'"))


def _preceding(sents: list[tuple[int, str]], i: int, cap: int) -> str | None:
    """The sentences before ``sents[i]``, newest first, while they fit in ``cap`` words."""
    chosen: list[tuple[int, str]] = []
    total = 0
    for j in range(i - 1, -1, -1):
        n = len(sents[j][1].split())
        if total + n > cap:
            break
        chosen.append(sents[j])
        total += n
    if not chosen:
        return None
    chosen.reverse()
    out = chosen[0][1]
    for (p_prev, _), (p, s) in zip(chosen, chosen[1:], strict=False):
        out += ("\n\n" if p != p_prev else " ") + s
    return out


def _join(words: list[str], para_of: list[int]) -> str:
    out = words[0]
    for k in range(1, len(words)):
        out += ("\n\n" if para_of[k] != para_of[k - 1] else " ") + words[k]
    return out


def _sample(docs: list[dict[str, Any]], spec: LocalTaskSpec) -> list[dict[str, Any]]:
    rng = random.Random(spec.seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    if len(docs) < spec.n_examples:
        raise LowbitError(
            f"corpus {spec.corpus} yields only {len(docs)} examples, fewer than "
            f"n_examples={spec.n_examples}; use a longer corpus or fewer examples"
        )
    return [{"id": k, **docs[i]} for k, i in enumerate(order[: spec.n_examples])]


def _task_configs(folder: Path, spec: LocalTaskSpec) -> dict[str, dict[str, Any]]:
    meta = {"version": float(CONSTRUCTION_VERSION), "lowbit_spec": asdict(spec)}

    def config(name: str, output_type: str, fields: dict[str, str], metrics: list[str]) -> dict:
        return {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(folder / f"{name}.jsonl")}},
            "test_split": "test",
            "output_type": output_type,
            "doc_to_text": "{{context}}",
            **fields,
            "metric_list": [
                {
                    "metric": m,
                    "aggregation": "perplexity" if m == "perplexity" else "mean",
                    "higher_is_better": m != "perplexity",
                }
                for m in metrics
            ],
            "metadata": meta,
        }

    return {
        CLOZE_TASK: config(
            CLOZE_TASK,
            "loglikelihood",
            {"doc_to_target": "{{' ' + target}}"},
            ["acc", "perplexity"],
        ),
        NEXTSENT_TASK: config(
            NEXTSENT_TASK,
            "multiple_choice",
            {"doc_to_choice": "choices", "doc_to_target": "label"},
            ["acc", "acc_norm"],
        ),
    }


def local_tasks_dir(spec: LocalTaskSpec = LocalTaskSpec(), root: str | Path | None = None) -> Path:
    """Folder holding the local tasks' JSONL data and lm-eval YAML configs, built on first use.

    The folder is ``<root>/<key>`` with ``root`` defaulting to ``$LOWBIT_HOME/lm_eval_tasks`` and
    ``key`` a hash of the construction version, ``spec`` and the corpus text, so a change to
    any of them builds a fresh folder. Pass it to ``lm_eval.tasks.TaskManager(include_path=...)``.
    """
    from lowbit.models.bundled import lowbit_home

    text = load_text(spec.corpus)
    key_src = json.dumps(
        {"v": CONSTRUCTION_VERSION, "spec": asdict(spec), "text": text_sha256(text)},
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    folder = Path(root) if root is not None else lowbit_home() / "lm_eval_tasks"
    folder = folder / key
    if (folder / "manifest.json").is_file():
        return folder
    paras = paragraphs(text)
    data = {CLOZE_TASK: build_cloze(paras, spec), NEXTSENT_TASK: build_nextsent(paras, spec)}
    with atomic_dir(folder) as tmp:
        for name, docs in data.items():
            lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
            (tmp / f"{name}.jsonl").write_text(lines, encoding="utf-8")
        for name, config in _task_configs(folder, spec).items():
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        manifest = {
            "construction_version": CONSTRUCTION_VERSION,
            "spec": asdict(spec),
            "corpus_sha256": text_sha256(text),
            "examples": {name: len(docs) for name, docs in data.items()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder
