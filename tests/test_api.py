"""The Python API (`import dynaexq_jax as dx`): the README example, the engine's steps inside
one's own `jax.jit`, the stats, and the persistent compilation cache of the scripts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynaexq_jax as dx
from dynaexq_jax.runtime.engine import stop_array

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "checkpoints" / "tiny-qwen3-moe"


def readme_example(n: int = 0) -> str:
    """The `n`th python block of the README's "Python API" section."""
    section = (ROOT / "README.md").read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)[n]


def test_readme_example_runs_and_its_own_jit_matches_the_engine(monkeypatch):
    monkeypatch.chdir(ROOT)  # the example names the shipped checkpoint by its relative path
    ns: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), ns)
    assert ns["gen"].tokens[0] and "promotions" in ns["eng"].policy.stats()
    assert float(ns["nll"](ns["eng"].params, ns["eng"].policy.experts)) == pytest.approx(
        -float(np.sum(ns["logps"][0], dtype=np.float64)), rel=1e-5)


def test_readme_launch_example_runs_the_scripts_path_within_its_budget(monkeypatch):
    monkeypatch.chdir(ROOT)
    ns: dict = {}
    exec(compile(readme_example(1), "README.md", "exec"), ns)
    assert ns["gen"].tokens[0] and ns["plan"].total <= dx.parse_size("30MB")
    assert ns["text"].startswith("memory plan: tiny-qwen3-moe (") and "parameters), policy dynaexq" in ns["text"]
    assert "fallback" in ns["text"]


@pytest.fixture(scope="module")
def full_engine():
    ckpt = dx.load(MODEL, jnp.float32)
    return dx.build_engine(ckpt, "full", budget=None, batch=1, longest_prompt=16, max_new_tokens=8)[0]


def test_prefill_and_decode_steps_in_ones_own_jit_generate_what_the_engine_generates(full_engine):
    eng, ckpt = full_engine, full_engine.checkpoint
    ids = ckpt.tokenizer.encode("def fibonacci(n):").ids
    new = 8
    want = eng.generate([ids], new, eos_token_ids=[]).tokens[0]
    tokens, positions, valid = dx.left_pad([ids], 16)
    knobs = dx.SamplingParams().as_arrays() + (stop_array(set()),)
    key = jax.random.key(0)
    steps = eng.steps

    @jax.jit
    def greedy(params, experts):
        cache = dx.KVCache.empty(ckpt.config, 1, 128, ckpt.dtype)
        stats = dx.RoutingStats.zeros(len(ckpt.config.moe_layers), ckpt.config.num_experts)
        carry = steps.prefill(params, experts, cache, stats, tokens, positions, valid, key, knobs,
                              greedy=True, fresh=True)

        def step(carry, _):
            cache, stats, state = steps.decode(params, experts, *carry, key, knobs, greedy=True)
            return (cache, stats, state), state.tokens[0]

        (_, stats, _), rest = jax.lax.scan(step, carry, None, length=new - 1)
        return jnp.concatenate([carry[2].tokens, rest]), stats.tokens

    got, seen = greedy(eng.params, eng.policy.experts)
    assert list(np.asarray(got)) == want
    assert int(seen) == len(ids) + new - 1  # the statistics count the prompt and every fed-back token


def test_policies_report_their_convert_time(full_engine):
    ckpt = full_engine.checkpoint
    static = dx.build_engine(ckpt, "static", budget=None, batch=1, longest_prompt=16, max_new_tokens=8)[0]
    assert static.policy.stats()["convert_s"] > 0
    assert full_engine.policy.stats()["convert_s"] == 0.0


def _generate(cache_dir: Path, *flags: str) -> dict:
    env = {**os.environ, "DYNAEXQ_COMPILE_CACHE": str(cache_dir), "DYNAEXQ_CACHE": "0"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompt", "def fibonacci(n):", "--max-new-tokens",
         "8", "--policy", "full", "--json", "--quiet", *flags],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


def test_second_run_reads_compiled_steps_back_and_the_cache_is_optional(tmp_path):
    cache = tmp_path / "jax"  # absent: a first run (and a run after deleting the directory) compiles afresh
    cold = _generate(cache)
    assert any(cache.iterdir())
    warm = _generate(cache)
    assert warm["outputs"] == cold["outputs"]
    assert warm["stats"]["compile_s"] < cold["stats"]["compile_s"] / 2
    assert warm["stats"]["compile_cache"] == str(cache) and warm["stats"]["backend"] == "cpu"
    off = _generate(tmp_path / "unused", "--no-compile-cache")
    assert off["stats"]["compile_cache"] is None and not (tmp_path / "unused").exists()
    assert {"load_s", "convert_s", "fill_s", "compile_s", "device"} <= set(off["stats"])
