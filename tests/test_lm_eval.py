"""lm-eval adapter numerics, the offline local tasks, and ``lowbit eval --tasks``."""

from __future__ import annotations

import json
import re

import pytest
import torch
from lm_eval.api.instance import Instance

from lowbit.cli.main import main
from lowbit.data.corpora import load_text
from lowbit.eval.lm_eval_adapter import LowbitLM, run_tasks
from lowbit.eval.local_tasks import (
    CLOZE_TASK,
    NEXTSENT_TASK,
    LocalTaskSpec,
    local_tasks_dir,
    paragraphs,
    split_sentences,
)

SMALL = LocalTaskSpec(n_examples=120)


@pytest.fixture(scope="module")
def tokenizer(smollm2_2blocks):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_2blocks)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def small_tasks(tmp_path_factory):
    return local_tasks_dir(SMALL, root=tmp_path_factory.mktemp("tasks"))


def _requests(pairs):
    return [Instance("loglikelihood", {}, pair, idx) for idx, pair in enumerate(pairs)]


def _manual(model, tokenizer, context, continuation, prefix):
    """log p(continuation | context) and is_greedy by one full forward pass."""
    ctx = prefix + tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = prefix + tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if not context:
        ctx = prefix
        whole = prefix + tokenizer(continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logp = torch.log_softmax(logits[len(ctx) - 1 : -1], dim=-1)
    target = torch.tensor(cont)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


PAIRS = [
    ("It is a truth universally acknowledged, that a single man", " in possession"),
    ("It is a truth universally acknowledged, that a single man", " of good fortune"),
    ("It is a truth universally acknowledged, that a single man", " must be"),
    ("My dear Mr. Bennet", ", have you heard"),
    ("Elizabeth", " smiled and said nothing at all to her sister that evening."),
    ("", " Pride"),
]


@pytest.mark.parametrize(
    "add_bos,batch_size,share",
    [(False, 1, False), (False, 3, True), (True, 4, False), (True, 8, True)],
)
def test_loglikelihood_equals_manual(tiny, tokenizer, add_bos, batch_size, share):
    lm = LowbitLM(
        model=tiny, tokenizer=tokenizer, add_bos=add_bos, batch_size=batch_size, share_prefix=share
    )
    got = lm.loglikelihood(_requests(PAIRS), disable_tqdm=True)
    for (ctx, cont), (logprob, greedy) in zip(PAIRS, got, strict=True):
        bos = [tokenizer.bos_token_id] if add_bos else []
        prefix = bos if ctx else [tokenizer.bos_token_id if add_bos else tokenizer.eos_token_id]
        want, want_greedy = _manual(tiny, tokenizer, ctx, cont, prefix)
        assert logprob == pytest.approx(want, abs=1e-4), (ctx, cont)
        assert greedy == want_greedy
        assert logprob < 0


def test_greedy_continuation_is_greedy(tiny, tokenizer):
    ctx = "She was"
    ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(tiny(torch.tensor([ids])).logits[0, -1].argmax()))
    n_ctx = len(tokenizer(ctx, add_special_tokens=False)["input_ids"])
    lm = LowbitLM(model=tiny, tokenizer=tokenizer)
    ((_, greedy),) = lm._loglikelihood_tokens([(None, ids[:n_ctx], ids[n_ctx:])])
    assert greedy
    wrong = ids[n_ctx:-1] + [(ids[-1] + 1) % len(tokenizer)]
    ((_, greedy),) = lm._loglikelihood_tokens([(None, ids[:n_ctx], wrong)])
    assert not greedy


def test_long_input_keeps_last_max_length_tokens(tiny, tokenizer):
    lm = LowbitLM(model=tiny, tokenizer=tokenizer, max_length=8)
    ctx = list(range(100, 130))
    cont = [7, 8, 9]
    ((got, _),) = lm._loglikelihood_tokens([(None, ctx, cont)])
    whole = (ctx + cont)[-9:]
    with torch.no_grad():
        logp = torch.log_softmax(tiny(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    want = sum(logp[5 + k, t].item() for k, t in enumerate(cont))
    assert got == pytest.approx(want, abs=1e-4)


def test_rolling_loglikelihood_equals_manual(tiny, tokenizer):
    text = "It is a truth universally acknowledged, that a single man in possession."
    lm = LowbitLM(model=tiny, tokenizer=tokenizer)
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(tiny(torch.tensor([ids[:-1]])).logits[0].double(), -1)
    want = logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert got == pytest.approx(want, abs=1e-4)
    short = LowbitLM(model=tiny, tokenizer=tokenizer, max_length=5)
    (chunked,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert chunked != pytest.approx(want, abs=1e-4)  # less context per token: a different score


def _greedy(model, tokenizer, context, steps):
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    n = len(ids)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            ids.append(nxt)
    return tokenizer.decode(ids[n:], skip_special_tokens=True)


def test_generate_until_batched_equals_single_greedy(tiny, tokenizer):
    contexts = ["Mr. Darcy", "It is a truth universally acknowledged that"]
    want = [_greedy(tiny, tokenizer, c, 6) for c in contexts]
    lm = LowbitLM(model=tiny, tokenizer=tokenizer, batch_size=2)
    reqs = [
        Instance("generate_until", {}, (c, {"until": ["\n\n\n"], "max_gen_toks": 6}), i)
        for i, c in enumerate(contexts)
    ]
    assert lm.generate_until(reqs, disable_tqdm=True) == want
    stop = want[1][len(want[1]) // 2 :][:3]
    assert stop
    reqs = [Instance("generate_until", {}, (contexts[1], {"until": [stop], "max_gen_toks": 6}), 0)]
    assert lm.generate_until(reqs, disable_tqdm=True) == [want[1].split(stop)[0]]


def test_bos_handling(tiny, tokenizer):
    with_bos = LowbitLM(model=tiny, tokenizer=tokenizer, add_bos=True)
    without = LowbitLM(model=tiny, tokenizer=tokenizer, add_bos=False)
    bos = tokenizer.bos_token_id
    assert with_bos.tok_encode("Elizabeth")[0] == bos
    assert with_bos.tok_encode(tokenizer.bos_token + "Elizabeth").count(bos) == 1
    assert with_bos.tok_encode("Elizabeth", add_special_tokens=False)[0] != bos
    assert without.tok_encode("Elizabeth")[0] != bos
    assert with_bos.prefix_token_id == bos and without.prefix_token_id == tokenizer.eos_token_id


# ----------------------------------------------------------------------- local tasks
def _docs(folder, name):
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]


def test_local_tasks_are_deterministic(tmp_path, small_tasks):
    again = local_tasks_dir(SMALL, root=tmp_path)
    assert again.name == small_tasks.name
    for name in (CLOZE_TASK, NEXTSENT_TASK):
        assert (again / f"{name}.jsonl").read_bytes() == (
            small_tasks / f"{name}.jsonl"
        ).read_bytes()
    other = local_tasks_dir(LocalTaskSpec(n_examples=120, seed=7), root=tmp_path)
    assert other.name != small_tasks.name
    assert _docs(other, CLOZE_TASK) != _docs(small_tasks, CLOZE_TASK)


def test_cloze_task_is_well_formed(small_tasks):
    docs = _docs(small_tasks, CLOZE_TASK)
    paras = paragraphs(load_text("austen-pp"))
    book = "\n\n".join(paras)
    assert [d["id"] for d in docs] == list(range(SMALL.n_examples))
    assert len({d["paragraph"] for d in docs}) == len(docs)
    for d in docs:
        assert re.fullmatch(r"[A-Za-z]+", d["target"])
        assert len(d["context"].split()) == SMALL.cloze_context_words
        passage = d["context"] + " " + d["target"]
        at = book.find(passage)
        assert at >= 0, passage[-80:]
        assert book[at + len(passage) : at + len(passage) + 1] in ("", "\n", *".,;:!?\"')")
        assert paras[d["paragraph"]].rstrip(".,;:!?\"')").endswith(d["target"])


def test_nextsent_task_is_well_formed(small_tasks):
    docs = _docs(small_tasks, NEXTSENT_TASK)
    book = "\n\n".join(paragraphs(load_text("austen-pp")))
    labels = set()
    for d in docs:
        choices, label = d["choices"], d["label"]
        assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= label < 4
        labels.add(label)
        true = choices[label]
        assert d["context"] + " " + true in book
        assert len(d["context"].split()) <= SMALL.nextsent_context_words
        n = len(true.split())
        for c in choices:
            assert abs(len(c.split()) - n) <= max(2, round(0.25 * n))
            assert c[:1] in "\"'" if true[:1] in "\"'" else c[:1] not in "\"'"
            assert re.search(r"[.!?][\"')]*$", c)
    assert labels == {0, 1, 2, 3}


def test_split_sentences_keeps_abbreviations():
    para = 'Mr. Bennet was silent. "Is he married?" cried she. Mrs. Long said so!'
    assert split_sentences(para) == [
        "Mr. Bennet was silent.",
        '"Is he married?" cried she.',
        "Mrs. Long said so!",
    ]


def test_local_task_metrics_match_adapter(tiny, tokenizer, small_tasks, monkeypatch):
    """lm-eval's acc on the local tasks equals the adapter's own answers, doc by doc: the task
    configs wire context, continuation delimiter and label the way the construction means."""
    monkeypatch.setattr("lowbit.eval.local_tasks.local_tasks_dir", lambda *a, **k: small_tasks)
    lm = LowbitLM(model=tiny, tokenizer=tokenizer, batch_size=8)
    n = 6
    out = run_tasks(lm, [CLOZE_TASK, NEXTSENT_TASK], limit=n)
    assert out["n_samples"] == {CLOZE_TASK: n, NEXTSENT_TASK: n}
    cloze = _docs(small_tasks, CLOZE_TASK)[:n]
    answers = lm.loglikelihood(
        _requests([(d["context"], " " + d["target"]) for d in cloze]), disable_tqdm=True
    )
    assert out["results"][CLOZE_TASK]["acc"] == pytest.approx(sum(g for _, g in answers) / n)
    mc = _docs(small_tasks, NEXTSENT_TASK)[:n]
    hits = 0
    for d in mc:
        lls = lm.loglikelihood(
            _requests([(d["context"], " " + c) for c in d["choices"]]), disable_tqdm=True
        )
        hits += max(range(4), key=lambda k: lls[k][0]) == d["label"]
    assert out["results"][NEXTSENT_TASK]["acc"] == pytest.approx(hits / n)
    stderr = out["results"][NEXTSENT_TASK]["acc_stderr"]
    p = hits / n
    assert stderr == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5)


# ------------------------------------------------------------------------------ CLI
def test_cli_eval_tasks_writes_json(capsys, tmp_path, smollm2_2blocks):
    out = tmp_path / "e.json"
    code = main(
        [
            "eval",
            str(smollm2_2blocks),
            "--tasks",
            f"{CLOZE_TASK},{NEXTSENT_TASK}",
            "--limit",
            "3",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert re.search(r"lowbit_nextsent_austen\s+acc\s", printed)
    data = json.loads(out.read_text())
    assert data["ppl"] == {} and data["avg_bits"] == 32.0
    assert data["seconds"] >= data["lm_eval"]["seconds"] > 0
    assert data["lm_eval"]["n_samples"] == {CLOZE_TASK: 3, NEXTSENT_TASK: 3}
    for task in (CLOZE_TASK, NEXTSENT_TASK):
        assert 0.0 <= data["tasks"][task]["acc"] <= 1.0
        assert data["tasks"][task]["acc_stderr"] is not None


def test_hub_task_without_data_is_one_line_exit_2(capsys, smollm2_2blocks):
    code = main(["eval", str(smollm2_2blocks), "--tasks", f"{CLOZE_TASK},piqa"])
    captured = capsys.readouterr()
    assert code == 2
    err = captured.err
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1, err
    assert "'piqa'" in err and "dataset baber/piqa is not available offline" in err
    assert "Traceback" not in err and captured.out == ""


def test_registered_as_lm_eval_model(smollm2_2blocks):
    from lm_eval.api.registry import get_model

    lm = get_model("lowbit").create_from_arg_string(
        f"pretrained={smollm2_2blocks},batch_size=2", {"batch_size": None, "device": None}
    )
    assert isinstance(lm, LowbitLM)
    assert (lm.batch_size, lm.add_bos, lm.max_length) == (2, False, 2048)
    ((logprob, _),) = lm.loglikelihood(_requests([("Elizabeth", " smiled")]), disable_tqdm=True)
    assert logprob < 0
