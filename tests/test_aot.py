"""The decode step compiled for an H200 without a GPU: it reads the experts it routes to, not
the slot pool, and what it launches (the compiles need the compile-only GPU stack; see README
"Compiling for a GPU"). How launches are counted from XLA's thunk dump is pinned on a dump's
own text, with no stack needed."""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

import pytest

from dynaexq_jax.runtime import aot, engine
from pallas_kernels.decode_attention import block_rows, num_splits

ROOT = Path(__file__).resolve().parent.parent
AOT_PYTHON = Path(os.environ.get("DYNAEXQ_AOT_PYTHON", ROOT / ".aot-venv" / "bin" / "python"))
MODEL = ROOT / "checkpoints" / "tiny-qwen3-moe"

needs_aot = pytest.mark.skipif(
    not AOT_PYTHON.exists(),
    reason=f"the compile-only GPU stack is not installed at {AOT_PYTHON} (set DYNAEXQ_AOT_PYTHON; .ci/run installs it)",
)


@functools.lru_cache(maxsize=None)  # tests share compiles
def report(*args, source=("--model", str(MODEL)), fused: bool = False) -> list[dict]:
    """aot_report's steps; `fused`: with the opt-in fused decode layer (`models.fused_decode`)."""
    out = subprocess.run([str(AOT_PYTHON), str(ROOT / "scripts" / "aot_report.py"), *source, "--json", *args],
                         capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "DYNAEXQ_FUSED_DECODE": "1" if fused else "0",
                              "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"})  # a GPU's compile as users get it
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)["steps"]


@needs_aot
def test_decode_reads_the_routed_experts_not_the_whole_slot_pool():
    # 25 MB: every expert's int4 fallback and a few slots; 40 MB: a slot for every expert.
    few, every = (report("--budget", budget, "--batch", "1", "--context", "256", "--policy", "dynaexq",
                         "--steps", "decode", "--gpu", "h100,h200") for budget in ("25MB", "40MB"))
    for s in few + every:
        assert s["pallas_bytes"] > 0  # the experts ran as Pallas kernels, as on a GPU
        assert s["bytes"] <= 1.25 * s["min_bytes"], s  # XLA's own step (the fused layer's: below)
        assert s["compile_s"] < 60
    assert few[0]["slots"] < 32 and every[0]["slots"] == 128
    # Slots ten times over cost only what reading the hot experts at high precision costs.
    assert every[0]["bytes"] - few[0]["bytes"] <= 1.25 * (every[0]["min_bytes"] - few[0]["min_bytes"]) + 20_000


@needs_aot
def test_decode_runs_seven_kernels_a_layer_all_captured_in_cuda_graphs():
    """The fused decode layer (`models.fused_decode`) at batch 1 and 32: six kernels and the
    loop's counter a layer, every kernel inside XLA's command buffers, so the host launches one
    graph a layer and one before and after the loop."""
    steps = report("--budget", "25MB", "--batch", "1", "--context", "256", "--policy", "dynaexq", "--steps", "decode",
                   "--gpu", "h100,h200", fused=True) + report("--budget", "160MB", "--batch", "32", "--context",
                                                              "256", "--policy", "dynaexq", "--steps", "decode",
                                                              "--gpu", "h200", fused=True)
    assert len(steps) == 3
    # Beyond the minimum the kernel chooses one traffic: attention's split-K partials (float32, a
    # tensor-core block of rows per KV head), written and read back, to fill the GPU at small
    # batch. The tiny model's 2 query heads a KV head and 32-wide heads make them a third of its
    # batch-32 KV read; Qwen3-30B's 8 and 128 make them a few percent (the 30B test below).
    cfg = json.loads((MODEL / "config.json").read_text())
    kvh, d = cfg["num_key_value_heads"], cfg["head_dim"]
    rows = block_rows(cfg["num_attention_heads"] // kvh)
    for s in steps:
        splits = num_splits(s["batch"], kvh, s["context"])
        partials = 2 * s["layers"] * splits * s["batch"] * kvh * rows * (d + 2) * 4
        assert s["bytes"] <= 1.1 * (s["min_bytes"] + partials), (s, partials)
        assert s["in_loops"] <= 7 * s["layers"], s
        assert s["in_graphs"] == s["launches"] and s["outside_graphs"] <= s["layers"] + 2, s


@needs_aot
@pytest.mark.parametrize("budget, batch", [("20GB", "1"), ("40GB", "32")])
def test_the_30b_decode_step_launches_at_most_eight_kernels_a_layer(budget, batch):
    """Qwen3-30B-A3B's shapes (nothing allocated), batch 1 in a 20 GB plan and 32 in 40 GB: every
    kernel the step runs, the embedding, final norm, LM head and sampling included, over its 48
    layers. Compiling for the GPU also holds each kernel to the H200's shared memory (a deeper
    pipeline of the attention merge's reads asked for 292 KB of its 227)."""
    (s,) = report("--budget", budget, "--batch", batch, "--context", "1024", "--policy", "dynaexq", "--steps",
                  "decode", "--kernels", source=("--preset", "qwen3-30b-a3b"), fused=True)
    # Each Pallas kernel's programs (its grid), what its parallelism on the GPU's 132 SMs starts from.
    programs = {k["label"].removeprefix("custom-call pallas:"): k["programs"] for k in s["launch_list"]
                if k["label"].startswith("custom-call pallas:")}
    assert programs["attn_in"] == 32 + 2 * 4 and programs["moe_route"] == 1, programs  # q, k, v heads; one
    assert s["launches"] <= 8 * s["layers"] and s["in_loops"] <= 7 * s["layers"], s
    assert s["bytes"] <= 1.1 * s["min_bytes"], s
    assert s["compile_cpu_s"] <= 30, s  # CPU time: the shared machine's load does not inflate it


@needs_aot
@pytest.mark.parametrize("budget, batch", [("20GB", "1"), ("40GB", "32")])
def test_the_default_30b_step_launches_every_kernel_inside_cuda_graphs(budget, batch):
    """XLA's own step (the default) for Qwen3-30B-A3B: every kernel inside a graph, one graph a
    layer and one before and after the loop. A small parameter's slice (a norm's weights) left
    beside a consumer XLA fuses for Triton ran as an async copy outside them: 5 host launches a
    layer (`models.layers.LayerSlice.value`). With the opt-in `GRAPH_KINDS` the loop joins them:
    the host launches the whole step as one graph."""
    args = ("--budget", budget, "--batch", batch, "--context", "1024", "--policy", "dynaexq", "--steps", "decode")
    (s,) = report(*args, source=("--preset", "qwen3-30b-a3b"))
    assert s["in_graphs"] == s["launches"] and s["outside_graphs"] <= s["layers"] + 2, s
    (s,) = report(*args, "--command-buffer", engine.GRAPH_KINDS, source=("--preset", "qwen3-30b-a3b"))
    assert s["in_graphs"] == s["launches"] and s["graphs"] == s["outside_graphs"] == 1, s


@needs_aot
def test_static_decode_is_within_a_quarter_of_the_minimum():
    (step,) = report("--policy", "static", "--batch", "1", "--context", "256", "--steps", "decode")
    assert step["bytes"] <= 1.25 * step["min_bytes"], step


def test_a_report_whose_every_row_is_refused_is_an_error_before_any_compile(capsys):
    from conftest import script

    code = script("aot_report").main(["--model", str(MODEL), "--budget", "20MB", "--policy", "full", "--steps",
                                      "decode"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: no step to compile: policy full at batch 1 is refused (policy 'full' "
                                        "needs") and err.count("\n") == 1, err


# A thunk dump as XLA's GPU backend writes it (module.thunk_sequence_after_thunk_passes.txt),
# cut down: a graph before the loop, a 48-layer loop whose body is a kernel launched on its
# own, an async slice (a copy with no instruction of its own) and a graph, then a graph after.
THUNKS = """\
000: kCommandBuffer [source       | next=012 (1)]
    001: kCopy         [source       | sink        ] kCopy
    002: kCustomKernel [source       | sink        ] loop_add_fusion_4 grid: [1, 1, 1] threads: [1, 1, 1]
012: kWhile         [prev=000 (1) | next=000 (1)]
condition:
    013: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1] threads: [1, 1, 1]
  body:
    014: kAsyncStart    [source       | next=000 (5)] stream=computation_stream[0], async_id=14
        016: kDynamicSliceFusion [source | sink] params=1, results=1
            015: kCopy [source | sink] kCopy
    019: kCustomKernel  [prev=018 (1) | next=000 (2)] layer_matmul_tm16_m1 grid: [1, 80, 1] threads: [128, 1, 1]
    020: kAsyncDone     [source       | sink        ] async_id=14
    000: kCommandBuffer [prev=019 (2) | sink        ]
        024: kCustomKernel [prev=023 (1)  | next=025 (1)] decode_attention grid: [1, 4, 16] threads: [128, 1, 1]
        046: kCustomKernel [prev=045 (1)  | sink        ] loop_add_fusion grid: [1, 1, 1] threads: [1, 1, 1]
000: kCommandBuffer [prev=012 (1) | sink        ]
    053: kCustomKernel [prev=052 (1) | next=054 (1)] gemm_fusion_dot_1 grid: [9496, 1, 1] threads: [64, 1, 1]
"""
METADATA = "".join(f'thunk_metadata {{\n  thunk_info {{\n    profile_annotation: "{name}"\n'
                   f'    thunk_id: {i}\n  }}\n}}\n'
                   for i, name in [(1, "copy.28"), (2, "loop_add_fusion.4"), (12, "while.5"),
                                   (13, "loop_compare_fusion"), (14, "fusion-start"),
                                   (16, "loop_dynamic_slice_fusion.1"), (19, "pallas_call.36"),
                                   (24, "pallas_call.37"), (46, "loop_add_fusion"), (53, "gemm_fusion_dot.1")])


def test_launches_apply_trip_counts_skip_known_conditions_and_say_what_runs_in_graphs():
    runs = aot.launches(THUNKS, METADATA, {"while.5": 48})
    got = [(w.name, w.kind, w.trips, w.in_graph) for w in runs.work]
    assert got == [("copy.28", "kCopy", 1, True), ("loop_add_fusion.4", "kCustomKernel", 1, True),
                   # the condition of a loop with a known trip count never runs
                   ("loop_dynamic_slice_fusion.1", "kCopy", 48, False),  # named for the fusion it runs for
                   ("pallas_call.36", "kCustomKernel", 48, False),
                   ("pallas_call.37", "kCustomKernel", 48, True), ("loop_add_fusion", "kCustomKernel", 48, True),
                   ("gemm_fusion_dot.1", "kCustomKernel", 1, True)]
    assert runs.graphs == 1 + 48 + 1 and runs.unknown_loops == 0
    assert (runs.kernels, runs.in_graphs, runs.outside, runs.in_loops) == (195, 99, 2 * 48 + 50, 4 * 48)
    # Without a known trip count the condition runs, and the loop is reported as unknown.
    unknown = aot.launches(THUNKS, METADATA, {})
    assert unknown.unknown_loops == 1 and ("loop_compare_fusion", "kCustomKernel", 1, False) in [
        (w.name, w.kind, w.trips, w.in_graph) for w in unknown.work]


def test_trip_counts_are_read_off_the_optimized_hlo():
    hlo = ('  %while.5 = (s32[], bf16[1,1,2048]{2,1,0}) while(%tuple.61), condition=%region_18, body=%region_3, '
           'backend_config={"known_trip_count":{"n":"48"},"known_init_step":{"init":"0","step":"1"}}\n'
           '  %while.7 = (s32[]) while(%tuple.9), condition=%c, body=%b\n')
    assert aot.trip_counts(hlo) == {"while.5": 48}


def test_a_loop_captured_in_a_graph_computes_its_predicate_on_the_device_every_iteration():
    # XLA's command buffers with WHILE: the whole step one graph, the loop a conditional node.
    thunks = """\
000: kCommandBuffer [source | sink]
    001: kCustomKernel [source        | next=014 (13)] loop_broadcast_fusion grid: [48, 1, 1] threads: [128, 1, 1]
    014: kWhile        [prev=013 (1)  | next=023 (1) ]
condition:
        015: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1] threads: [1, 1, 1]
      body:
        016: kCustomKernel [source       | next=017 (1)] attn_in_m1 grid: [40, 1, 1] threads: [128, 1, 1]
        017: kCustomKernel [prev=016 (1) | next=018 (1)] loop_add_fusion grid: [1, 1, 1] threads: [1, 1, 1]
    023: kCustomKernel [prev=014 (1) | sink] gemm_fusion_dot.1 grid: [9496, 1, 1] threads: [64, 1, 1]
"""
    meta = "".join(f'thunk_info {{ profile_annotation: "{n}"\n thunk_id: {i} }}\n'
                   for i, n in [(1, "loop_broadcast_fusion"), (14, "while.5"), (15, "loop_compare_fusion"),
                                (16, "pallas_call.74"), (17, "loop_add_fusion"), (23, "gemm_fusion_dot.1")])
    runs = aot.launches(thunks, meta, {"while.5": 48})
    assert [(w.name, w.trips, w.in_graph) for w in runs.work] == [
        ("loop_broadcast_fusion", 1, True), ("loop_compare_fusion", 49, True), ("pallas_call.74", 48, True),
        ("loop_add_fusion", 48, True), ("gemm_fusion_dot.1", 1, True)]
    assert runs.graphs == 1 and runs.outside == 1 and runs.kernels == 147


@needs_aot
def test_latent_attention_decode_reads_the_latent_cache_once():
    """DeepSeek-V3's attention shapes (a 512 + 64 latent per token; 16 heads of 192 + 128 dims,
    8.9 times the latent expanded) at a context where the cache is most of what a decode step
    must read: the step reads within a quarter of the minimum, which counts the latent once."""
    (step,) = report("--batch", "8", "--context", "8192", "--steps", "decode", "--policy", "static",
                     source=("--preset", "deepseek-v3-smoke"))
    latent = 4 * 8 * 8192 * (512 + 64) * 2
    assert step["min_bytes"] > latent > step["min_bytes"] / 2
    assert step["bytes"] <= 1.25 * step["min_bytes"], step
