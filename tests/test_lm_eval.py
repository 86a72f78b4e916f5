"""lm-evaluation-harness: `--model dynaexq` against lm-eval's own `--model hf`, and against
scripts/eval.py, on the shipped checkpoint in float32 (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "checkpoints" / "tiny-qwen3-moe"
SHIPPED_TASKS = MODEL / "tasks" / "lm_eval"
SCRIPTS = ROOT / "scripts"
MAX_LENGTH = 96  # short rolling windows (a held-out document spans several); prompts are cut
MAX_CONTEXT = MAX_LENGTH - 24  # an exact-match prompt's share of it, beside its 24 new tokens
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
os.environ.update(OFFLINE)


harness = pytest.importorskip("lm_eval", reason='lm-eval is not installed (pip install -e ".[eval]")')
from lm_eval.tasks import TaskManager  # noqa: E402

from dynaexq_jax.errors import UserError  # noqa: E402
from dynaexq_jax.eval.lm_eval import DynaExqLM  # noqa: E402
from dynaexq_jax.io import loader  # noqa: E402

TASKS = ["tiny_next_line_mc", "tiny_heldout_ppl", "tiny_next_line_em"]


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _same_items(tok, item) -> bool:
    """Whether lm-eval and scripts/eval.py score the same tokens for this item: lm-eval encodes
    context + choice whole and cuts after the context's tokens (a context's trailing spaces
    going to the choice), eval.py encodes the two apart; and neither cuts the context."""
    ctx = tok.encode(item["context"]).ids
    whole = [tok.encode(item["context"] + c).ids for c in item["choices"]]
    return (item["context"] == item["context"].rstrip() and max(map(len, whole)) <= MAX_CONTEXT
            and all(w == ctx + tok.encode(c).ids for w, c in zip(whole, item["choices"])))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The shipped task YAMLs over small subsets of the shipped JSONL files."""
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    tok = loader.load_tokenizer(MODEL)
    read = lambda name: [json.loads(line) for line in (MODEL / "tasks" / name).read_text().splitlines()]
    mc = [it for it in read("next_line_mc.jsonl") if _same_items(tok, it)][:8]
    docs = read("heldout.jsonl")
    _jsonl(out / "next_line_mc.jsonl", mc)
    _jsonl(out / "heldout.jsonl", [{"text": docs[0]["text"][:1000]}, docs[2]])
    _jsonl(out / "next_line_em.jsonl", read("next_line_em.jsonl")[:6])  # 4 of them over MAX_CONTEXT tokens
    for task in TASKS:
        text = (SHIPPED_TASKS / f"{task}.yaml").read_text()
        (out / f"{task}.yaml").write_text(text.replace("checkpoints/tiny-qwen3-moe/tasks", str(out)))
    return out


def evaluate(lm, task_dir):
    out = harness.simple_evaluate(model=lm, tasks=TASKS, task_manager=TaskManager(include_path=str(task_dir)),
                                  log_samples=True)
    return out["results"], out["samples"]


@pytest.fixture(scope="module")
def ours(task_dir):
    lm = DynaExqLM(pretrained=str(MODEL), policy="full", dtype="float32", max_length=MAX_LENGTH, batch_size=4)
    return evaluate(lm, task_dir)


@pytest.fixture(scope="module")
def theirs(task_dir):
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (pip install -e '.[test]')")
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(MODEL), dtype="float32", device="cpu", batch_size=4, max_length=MAX_LENGTH)
    return evaluate(lm, task_dir)


def _responses(samples, task):
    return [s["resps"] for s in sorted(samples[task], key=lambda s: s["doc_id"])]


def test_metrics_equal_lm_evals_hf_model(ours, theirs):
    for task in TASKS:
        for metric, value in theirs[0][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours[0][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


def test_each_request_scores_as_lm_evals_hf_model(ours, theirs):
    (_, ours_s), (_, theirs_s) = ours, theirs
    for task in ("tiny_next_line_mc", "tiny_heldout_ppl"):
        a, b = _responses(ours_s, task), _responses(theirs_s, task)
        flat = lambda rs: [x for r in rs for (x,) in r]  # one (response,) per request
        for x, y in zip(flat(a), flat(b), strict=True):
            if task == "tiny_next_line_mc":  # (log-likelihood, is_greedy)
                assert x[0] == pytest.approx(y[0], abs=2e-4) and x[1] == y[1]
            else:  # a whole document's log-likelihood, over several windows
                assert x == pytest.approx(y, rel=1e-5)
    assert _responses(ours_s, "tiny_next_line_em") == _responses(theirs_s, "tiny_next_line_em")


def test_metrics_equal_scripts_eval_on_the_same_items(ours, task_dir, tmp_path):
    from dynaexq_jax.cli import eval as cli

    out = tmp_path / "eval.json"
    assert cli.main(["--policies", "full", "--dtype", "float32", "--batch-size", "4", "--json", str(out),
                     "--max-length", str(MAX_CONTEXT),
                     "--mc", str(task_dir / "next_line_mc.jsonl"), "--em", str(task_dir / "next_line_em.jsonl")]) == 0
    got = {(r["task"], r["metric"]): r["value"] for r in json.loads(out.read_text())["results"]}
    results = ours[0]
    assert got["next_line_mc", "acc"] == results["tiny_next_line_mc"]["acc,none"]
    assert got["next_line_mc", "acc_norm"] == results["tiny_next_line_mc"]["acc_norm,none"]
    assert got["next_line_em", "exact_match"] == results["tiny_next_line_em"]["exact_match,first_line"]


def test_offload_scores_as_full(task_dir, ours):
    """offload runs layer by layer and scores from logits on the host: every expert at full precision."""
    lm = DynaExqLM(pretrained=str(MODEL), policy="offload", dtype="float32", max_length=MAX_LENGTH, batch_size=4)
    out = harness.simple_evaluate(model=lm, tasks=["tiny_next_line_mc"], limit=3,
                                  task_manager=TaskManager(include_path=str(task_dir)), log_samples=True)
    full = _responses(ours[1], "tiny_next_line_mc")[:3]
    for got, want in zip(_responses(out["samples"], "tiny_next_line_mc"), full, strict=True):
        # Another summation order (layer by layer, or slots): float32 sums of ~100 tokens agree to ~1e-5.
        assert [ll for ((ll, _),) in got] == pytest.approx([ll for ((ll, _),) in want], rel=1e-4)


def test_bad_model_arguments_are_one_line_user_errors():
    with pytest.raises(UserError, match="no 'auto'"):
        DynaExqLM(pretrained=str(MODEL), batch_size="auto")
    with pytest.raises(UserError, match="dtype='float16'"):
        DynaExqLM(pretrained=str(MODEL), dtype="float16")


def test_cli_prints_lm_evals_table_for_dynaexq_under_a_budget(tmp_path):
    """The README's command, cut to a few items: lm-eval's own CLI with `--model dynaexq`."""
    env = {**os.environ, **OFFLINE, "DYNAEXQ_COMPILE_CACHE": str(tmp_path / "jax"), "DYNAEXQ_CACHE": "0"}
    model_args = f"pretrained={MODEL},policy=dynaexq,budget=60MB,dtype=float32,max_length=256"
    args = ["--model", "dynaexq", "--model_args", model_args, "--include_path", str(SHIPPED_TASKS),
            "--tasks", "tiny_next_line_mc", "--limit", "4", "--batch_size", "4"]
    run = subprocess.run([sys.executable, str(SCRIPTS / "lm_eval.py"), *args], check=False, cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "|tiny_next_line_mc|" in run.stdout.replace(" ", "") and "acc_norm" in run.stdout
