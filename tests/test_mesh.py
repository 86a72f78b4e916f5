"""Expert parallelism on a mesh (`runtime.mesh`): the same greedy tokens as one device, per-device
memory plans, and the refusals. Multi-device runs go through tests/mesh_worker.py in a process
of its own (4 CPU devices), so every other test keeps its one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dynaexq_jax.runtime import mesh as mesh_lib

ROOT = Path(__file__).resolve().parent.parent

QWEN3_235B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=4096,
    num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, moe_intermediate_size=1536, intermediate_size=12288, norm_topk_prob=True,
    rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, max_position_embeddings=40960,
    decoder_sparse_step=1, mlp_only_layers=[], torch_dtype="bfloat16",
)


@pytest.fixture(scope="module")
def mesh_runs(moe_checkpoint):
    path, _ = moe_checkpoint
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "mesh_worker.py"), str(path)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mesh_gives_one_devices_greedy_tokens_for_full_and_dynaexq(mesh_runs):
    ref = mesh_runs["full/1"]
    for name in ("full/2", "dynaexq/4"):
        assert mesh_runs[name]["batch"] == ref["batch"], name
    assert not mesh_runs["dynaexq/4"]["contiguous"]  # a balanced placement: experts spread out of id order
    assert mesh_runs["dynaexq/4"]["slots"] == ref["slots"] // 4  # a device's slots hold only its own experts
    assert mesh_runs["served/2"] == ref["batch"]  # the server's scheduler on the mesh
    one, two = mesh_runs["eval/1"], mesh_runs["eval/2"]  # scripts/eval.py's evaluation
    assert one.keys() == two.keys() == {"full", "dynaexq"}
    for policy in one:
        assert two[policy] == pytest.approx(one[policy], rel=1e-5), policy


def test_decode_step_all_reduces_one_hidden_row_per_sequence_and_moe_layer(mesh_runs):
    # From the compiled HLO: the psum of [batch 2, hidden 64] float32 in each of the 2 MoE layers (the
    # bucket of one prompt, batch 1, compiles a step of its own: [1, 64]).
    assert mesh_runs["dynaexq/4"]["collective_bytes"] == {"decode": 2 * 2 * 64 * 4}


def test_mesh_static_and_swapping_dynaexq_give_one_devices_tokens(mesh_runs):
    ref = mesh_runs["static/1"]  # int8: the values every swapping run computes with, whatever is resident
    for name in ("static/4", "swapping/2", "swapping/4"):
        assert mesh_runs[name]["batch"] == ref["batch"], name
    assert mesh_runs["swapping/4"]["single"] == ref["single"]
    assert not mesh_runs["swapping/2"]["contiguous"]
    for name in ("swapping/2", "swapping/4"):
        run = mesh_runs[name]
        assert run["demotions"] > 0 and run["promotions"] > run["slots"] * int(name[-1]), name  # experts moved
        assert 0 < run["hi_hit_rate"] < 1
        assert run["total"] <= run["budget"]  # each device's accounted bytes within its budget


def _generate(argv, capsys):
    from dynaexq_jax.cli import generate

    rc = generate.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_dry_run_plans_qwen3_235b_per_device_on_8(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_235B))
    base = ["--model", str(tmp_path), "--dry-run", "--mesh", "expert=8", "--lo-bits", "4", "--hi-dtype", "bfloat16"]
    rc, out, _ = _generate(base + ["--budget", "40GB", "--json"], capsys)
    plan = json.loads(out)["memory_plan"]
    assert rc == 0 and plan["slots"] > 0 and plan["total"] <= 40e9
    assert plan["num_experts_total"] == 94 * 16  # one device's share of the experts
    assert 15e9 < plan["weights"] < 17e9  # the replicated non-expert weights, whole routers included
    rc, out, err = _generate(base + ["--budget", "20GB"], capsys)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "per-device minimum is" in err and "--mesh expert=8" in err
    minimum = int(err.split("(")[-1].split(" bytes")[0])
    assert minimum == plan["minimum"]


@pytest.mark.parametrize("mesh, why", [("expert=3", "do not split evenly"), ("tensor=2", "only axis is 'expert'"),
                                       ("expert=8", "needs 8 devices")])
def test_bad_mesh_is_one_error_line(moe_checkpoint, capsys, mesh, why):
    path, _ = moe_checkpoint
    rc, out, err = _generate(["--model", str(path), "--mesh", mesh, "--max-new-tokens", "2", "--quiet"], capsys)
    assert rc == 2 and out == "" and err.startswith("error: ") and why in err and len(err.splitlines()) == 1


def test_offload_on_a_mesh_is_refused(moe_checkpoint, capsys):
    path, _ = moe_checkpoint
    rc, _, err = _generate(["--model", str(path), "--mesh", "expert=2", "--policy", "offload"], capsys)
    assert rc == 2 and "does not run on --mesh" in err


def test_balanced_placement_evens_a_skewed_load():
    rng = np.random.default_rng(0)
    load = rng.zipf(1.5, size=(3, 16)).astype(float)  # [L, E]
    blocks = mesh_lib.Placement.contiguous(3, 16, 4)
    balanced = mesh_lib.Placement.balanced(load, 4)
    assert sorted(balanced.experts[1].ravel().tolist()) == list(range(16))  # every expert owned once
    assert (balanced.owner[np.arange(3)[:, None], balanced.experts[:, 2]] == 2).all()
    assert balanced.imbalance(load) < blocks.imbalance(load)
    assert balanced.imbalance(load) >= 1.0
    np.testing.assert_array_equal(blocks.device_load(load).sum(axis=1), load.sum(axis=1))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_two_devices_print_one_process_tokens(mesh_runs, moe_checkpoint):
    import dynaexq_jax as dx
    from dynaexq_jax.models.registry import read_config

    path, _ = moe_checkpoint
    # int8 slots over int4 fallbacks (the command line refuses slots no wider than their fallback),
    # with room for every expert: each is promoted into a slot before the first token, so every
    # process computes with the int8 experts the single-device static run uses.
    tiers = dx.DynaExqOptions(lo_bits=4, hi_dtype="int8")
    floor = dx.plan_for(read_config(path), "dynaexq", budget=None, batch=2, longest_prompt=16,
                        max_new_tokens=12, dtype_itemsize=4, opts=tiers, devices=4)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    argv = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", str(path), "--dtype", "float32",
            "--prompt", "def f(x):", "--prompt", "the quick brown fox", "--max-new-tokens", "12", "--json",
            "--policy", "dynaexq", "--lo-bits", "4", "--hi-dtype", "int8",
            "--budget", str(floor.budget_for(floor.num_experts_total)), "--mesh", "expert=4",
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--distributed-timeout", "120"]
    procs = [subprocess.Popen(argv + ["--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert outs[1][0] == ""  # only process 0 writes stdout
    got = json.loads(outs[0][0])
    assert [o["token_ids"] for o in got["outputs"]] == mesh_runs["static/1"]["batch"]
    assert got["stats"]["promotions"] >= floor.num_experts_total and got["stats"]["mesh_devices"] == 4
    closing = [out[1].strip().splitlines()[-1] for out in outs]  # every process reports its own figures
    assert all(line.startswith("prompt ") and "generated 24 tok" in line for line in closing)
    # Each process reads only its own devices' experts from the checkpoint (and every non-expert tensor).
    from dynaexq_jax.budget import parse_size
    from dynaexq_jax.io import loader

    stored = loader.stored_nbytes(loader.weight_files(path))
    reads = [parse_size(line.split("| read ")[1].split(" of the checkpoint")[0]) for line in closing]
    cfg = read_config(path)
    experts = len(cfg.moe_layers) * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    for read in reads:
        assert abs(read - (stored - experts // 2)) < 0.01 * stored


def test_a_silent_coordinator_is_one_error_line_not_a_hang(moe_checkpoint):
    path, _ = moe_checkpoint
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", str(path), "--mesh",
                           "expert=2", "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
                           "--process-id", "1", "--distributed-timeout", "2"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert "no answer from the coordinator" in proc.stderr


def _lines(stream, into: list) -> None:
    for line in stream:
        into.append(line)


@pytest.mark.parametrize("victim", [0, 1])
def test_when_a_process_dies_the_other_exits_with_one_error_line_within_the_timeout(moe_checkpoint, victim):
    """Two processes of one mesh; one is killed once both have joined and loaded (process 0 hosts the
    coordination service: its death is known at once; process 1's after --distributed-timeout)."""
    import threading
    import time

    path, _ = moe_checkpoint
    port, timeout = _free_port(), 5
    argv = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", str(path), "--dtype", "float32",
            "--prompt", "def f(x):", "--max-new-tokens", "400", "--mesh", "expert=2", "--verbose", "--quiet",
            "--no-compile-cache", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
            "--distributed-timeout", str(timeout)]
    procs = [subprocess.Popen(argv + ["--process-id", str(i)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))) for i in range(2)]
    errs = [[], []]
    readers = [threading.Thread(target=_lines, args=(p.stderr, e), daemon=True) for p, e in zip(procs, errs)]
    for r in readers:
        r.start()
    try:
        deadline = time.time() + 120
        while not all(any(line.startswith("backend ") for line in e) for e in errs):  # --verbose: joined, loaded
            assert time.time() < deadline and all(p.poll() is None for p in procs), errs
            time.sleep(0.05)
        procs[victim].kill()  # the pid one started: its worker ends with it
        t0 = time.time()
        survivor = procs[1 - victim]
        rc = survivor.wait(timeout + 30)
        waited = time.time() - t0
        readers[1 - victim].join(10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert rc == 2 and waited < timeout + 3, (rc, waited)
    lost = errs[1 - victim][errs[1 - victim].index(next(e for e in errs[1 - victim] if e.startswith("backend "))) + 1:]
    assert [line for line in lost if not line.startswith("[Gloo]")] == [
        f"error: process {1 - victim} of 2 stopped: the mesh broke (the coordination service reports a process gone); "
        f"another process died or the coordinator at 127.0.0.1:{port} went away: restart all 2 processes\n"]


SUPERVISED = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("supervise", sys.argv[2])  # the file alone: no jax to import
supervise = importlib.util.module_from_spec(spec)
spec.loader.exec_module(supervise)
supervise.supervise(1, 2, "127.0.0.1:1")
case = sys.argv[1]
if case == "lose":
    supervise.lose("Gloo all-reduce failed:\\n Connection reset by peer")
os.write(2, b"E1204 coordination_service_agent.cc:289] Polled an error from coordination service\\n" if case != "fine"
         else b"a C-level line\\n")
print("a Python line", file=sys.stderr, flush=True)
if case == "xla":
    os.abort()
"""


@pytest.mark.parametrize("case, rc, err", [
    ("lose", 2, ["error: process 1 of 2 stopped: the mesh broke (Gloo all-reduce failed: Connection reset by peer); "
                 "another process died or the coordinator at 127.0.0.1:1 went away: restart all 2 processes"]),
    ("xla", 2, ["a Python line", "error: process 1 of 2 stopped: the mesh broke (the coordination service reports a "
                "process gone); another process died or the coordinator at 127.0.0.1:1 went away: restart all 2 "
                "processes"]),
    ("fine", 0, ["a C-level line", "a Python line"]),
    ("noise", 0, ["a Python line", "E1204 coordination_service_agent.cc:289] Polled an error from coordination "
                  "service"]),
])
def test_the_supervisor_makes_a_broken_mesh_one_error_line_and_passes_the_rest(case, rc, err):
    module = ROOT / "dynaexq_jax" / "runtime" / "supervise.py"
    proc = subprocess.run([sys.executable, "-c", SUPERVISED, case, str(module)], capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, sorted(proc.stderr.splitlines())) == (rc, sorted(err))  # two writers: any order
