"""Evaluation: perplexity, multiple choice and exact match on the shipped tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax.errors import UserError
from dynaexq_jax.eval import evaluate
from dynaexq_jax.io import loader
from dynaexq_jax.policies.dynaexq import DynaExqOptions, DynaExqPolicy
from dynaexq_jax.runtime.build import build_engine

MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-qwen3-moe"
PROFILE = MODEL / "tasks" / "hotness_train.json"

DOCS = [
    "import os\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def norm(self):\n"
    "        return (self.x ** 2 + self.y ** 2) ** 0.5\n",
    "for i in range(10):\n    print(i)\n",
]
MC = [  # the true continuation against noise: any code model should pick the first
    {"context": "def add(a, b):\n    return a", "choices": [" + b\n", " ]]]:::(((\n"], "answer": 0},
    {"context": "import os\nimport", "choices": [" )))))(((((", " sys\n"], "answer": 1},
    {"context": "for i in range(10):\n   ", "choices": [" print(i)\n", " ((((((((((\n"], "answer": 0},
]


@pytest.fixture(scope="module")
def ckpt():
    return loader.load(MODEL, jnp.float32)


def engine_for(ckpt, policy, **kw):
    kw = {"budget": None, "batch": 16, "longest_prompt": 64, "max_new_tokens": 8, **kw}
    return build_engine(ckpt, policy, **kw)[0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_perplexity_equals_direct_computation_from_engine_logits(ckpt):
    eng = engine_for(ckpt, "full")
    task = evaluate.Task("ppl", "docs", DOCS)
    rows = evaluate.Evaluator(eng, batch_size=4, window=32).run([task])
    (_, metric, ppl, n), = rows
    seqs = evaluate.ppl_sequences(ckpt.tokenizer, DOCS, ckpt.eos_token_ids[0], 32)
    nll = []
    for s in seqs:
        logp = jax.nn.log_softmax(eng.logits([s])[0], axis=-1)  # [len, V]
        nll += [-float(logp[t - 1, s[t]]) for t in range(1, len(s))]
    assert metric == "ppl" and n == len(nll) == sum(len(s) - 1 for s in seqs)
    assert ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)


def test_multiple_choice_picks_the_known_answers(ckpt, tmp_path):
    task = evaluate.load_task("mc", write_jsonl(tmp_path / "mc.jsonl", MC))
    rows = dict(((m, (v, n)) for _, m, v, n in evaluate.Evaluator(engine_for(ckpt, "full"), batch_size=3).run([task])))
    assert rows == {"acc": (1.0, 3), "acc_norm": (1.0, 3)}


def test_exact_match_compares_the_first_nonempty_line_stripped(ckpt, tmp_path):
    assert evaluate.first_line("\n   \n  x = 1  \ny = 2") == "x = 1"
    eng = engine_for(ckpt, "full")
    prompt = "def add(a, b):\n    return"
    ids = ckpt.tokenizer.encode(prompt).ids
    greedy = ckpt.tokenizer.decode(eng.generate([ids], 8).tokens[0], skip_special_tokens=True)
    items = [{"prompt": prompt, "answer": "  " + evaluate.first_line(greedy) + " "},
             {"prompt": prompt, "answer": "nope"}]
    task = evaluate.load_task("em", write_jsonl(tmp_path / "em.jsonl", items))
    assert evaluate.Evaluator(eng, max_new_tokens=8).run([task]) == [("em", "exact_match", 0.5, 2)]


@pytest.mark.parametrize("policy, budget", [("full", "none"), ("static", "none"), ("dynaexq", "+25%")])
def test_results_identical_for_batch_sizes_1_and_16(ckpt, tmp_path, policy, budget):
    tasks = [
        evaluate.Task("ppl", "docs", DOCS),
        evaluate.load_task("mc", write_jsonl(tmp_path / "mc.jsonl", MC)),
        evaluate.load_task("em", write_jsonl(tmp_path / "em.jsonl",
                                             [{"prompt": m["context"], "answer": "x"} for m in MC])),
    ]
    runs = [evaluate.RunSpec(policy, budget, 2)]
    kw = dict(hotness_profile=str(PROFILE), window=32, max_length=64, max_new_tokens=4)
    one = evaluate.evaluate_runs(ckpt, runs, tasks, batch_size=1, **kw)
    many = evaluate.evaluate_runs(ckpt, runs, tasks, batch_size=16, **kw)
    assert [(r.task, r.metric, r.n) for r in one] == [(r.task, r.metric, r.n) for r in many]
    for a, b in zip(one, many):
        # Counts (accuracy, exact match, pair shares) match exactly. A perplexity may differ in
        # the last float32 bits: XLA's CPU matmuls round differently for another batch shape,
        # which is not padding leaking in (that would move it by orders of magnitude more).
        assert a.value == (pytest.approx(b.value, rel=1e-6) if a.metric == "ppl" else b.value), a


def test_relative_budget_gives_dynaexq_that_share_of_experts_as_slots(ckpt):
    opts = DynaExqOptions(lo_bits=4)
    b = evaluate.resolve_budget("+25%", ckpt, opts, batch=16, longest=64, max_new_tokens=8)
    _, plan = build_engine(ckpt, "dynaexq", budget=b, batch=16, longest_prompt=64, max_new_tokens=8, opts=opts)
    assert plan.slots == math.ceil(0.25 * plan.num_experts_total)


@pytest.mark.parametrize("mode", ["pass", "frozen"])
def test_residency_lands_only_between_passes_and_never_when_frozen(ckpt, mode):
    # A short horizon: the first pass's routing, not the training profile, picks the second's residents.
    opts = DynaExqOptions(lo_bits=2, half_life_steps=1.0, save_profile=False)
    budget = evaluate.resolve_budget("+25%", ckpt, opts, batch=16, longest=64, max_new_tokens=8)
    eng = engine_for(ckpt, "dynaexq", budget=budget, opts=opts, hotness_profile=str(PROFILE))
    policy = eng.policy
    assert isinstance(policy, DynaExqPolicy)  # slots to move experts in and out of
    tasks = [evaluate.Task("ppl", "a", DOCS), evaluate.Task("ppl", "b", DOCS)]
    rows = evaluate.Evaluator(eng, batch_size=2, window=32, residency=mode).run(tasks)
    shares = [v for _, m, v, _ in rows if m == "hi_pair_share"]
    sw = policy.swapper
    assert eng.policy is policy and not sw.pending and not sw.inflight
    sw.check_invariants()
    if mode == "frozen":  # the warm-start set throughout: both passes see the same residency
        assert policy.stats()["promotions"] == policy.num_slots and shares[0] == shares[1]
    else:  # the first pass's routing moved experts in before the second pass, which hits them more
        assert policy.stats()["promotions"] > policy.num_slots and shares[1] > shares[0]


@pytest.mark.parametrize("kind, line, needle", [
    ("mc", '{"context": "a", "choices": ["b"], "answer": 0}', "at least two"),
    ("mc", '{"context": "a", "choices": ["b", "c"], "answer": 2}', "answer must be an index"),
    ("em", '{"prompt": "a"}', "'answer'"),
    ("ppl", "not json", "not valid JSON"),
])
def test_malformed_task_files_are_one_line_user_errors(tmp_path, kind, line, needle):
    path = tmp_path / "t.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=needle) as e:
        evaluate.load_task(kind, path)
    assert "\n" not in str(e.value)


def test_cli_reports_bad_input_as_error_line_and_exit_2(capsys):
    from dynaexq_jax.cli import eval as cli

    assert cli.main(["--policies", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: --policies 'nope': choose from")


def test_big_little_sweep_adds_a_row_per_share_with_its_measured_share(ckpt):
    from dynaexq_jax.eval.big_little import Sweep

    task = evaluate.Task("ppl", "docs", DOCS)
    runs = [evaluate.RunSpec("full", "none", 4)]
    sweep = Sweep(little_k=None, rule="router", floor=0.0, shares=(0.0, 0.5))
    results = evaluate.evaluate_runs(ckpt, runs, [task], batch_size=4, window=32, sweep=sweep)
    got = {(r.run, r.metric): r.value for r in results}
    assert set(got) == {("full", "ppl"), ("full little 50%", "ppl"), ("full little 50%", "little_share")}
    # thresholds are calibrated on this very text, so the measured share lands on the target
    assert got["full little 50%", "little_share"] == pytest.approx(0.5, abs=0.05)
    assert got["full little 50%", "ppl"] != got["full", "ppl"]
