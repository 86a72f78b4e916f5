"""Start-up at scale: one conversion pass, mapped caches, steps compiled ahead, exact when it fits."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.experts import quant, swap
from dynaexq_jax.io import hf_export, loader, preset, store
from dynaexq_jax.models import registry
from dynaexq_jax.policies import tiers
from dynaexq_jax.policies.dynaexq import DynaExqOptions
from dynaexq_jax.runtime import build as build_lib
from dynaexq_jax.runtime.build import build_engine
from dynaexq_jax.runtime.engine import Engine, Request

SHAPE = dict(batch=1, longest_prompt=16, max_new_tokens=8)
SMOKE = preset.PRESETS["qwen3-moe-smoke"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAEXQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DYNAEXQ_CACHE", "1")
    return tmp_path / "cache"


@pytest.fixture
def calls(monkeypatch):
    """Experts read from each source ({(matrix, layer): expert ids read, in order}) and quantize
    calls ({bits: n})."""
    reads, quantized = {}, {}
    real_on_device, real_quantize = preset.LazyLayers.on_device, quant.quantize

    def on_device(self, i, device=None, experts=slice(None)):
        reads.setdefault((self.shape[1:], i), []).extend(np.arange(self.shape[0])[experts].tolist())
        return real_on_device(self, i, device, experts)

    def quantize(w, bits, *a, **k):
        quantized[bits] = quantized.get(bits, 0) + 1
        return real_quantize(w, bits, *a, **k)

    monkeypatch.setattr(preset.LazyLayers, "on_device", on_device)
    monkeypatch.setattr(quant, "quantize", quantize)
    return reads, quantized


def smoke(seed=0, dtype=jnp.float32):
    return preset.random_checkpoint(preset.preset_config("qwen3-moe-smoke"), dtype, seed=seed, routing_skew=1.0)


def test_one_pass_reads_each_expert_once_and_quantizes_it_once_per_width(cache, calls):
    reads, quantized = calls
    ckpt = smoke()
    L, E = len(ckpt.config.moe_layers), ckpt.config.num_experts
    mid = np.zeros((L, E), bool)
    mid[:, :3] = True  # a mixed fallback: int4, three experts a layer at int8, and an int8 bank
    state, bank = tiers.fallback_and_bank(ckpt.experts, 4, 64, "rtn", mid_bits=8, mid=mid, bank_bits=8,
                                          source=ckpt.source)
    assert len(reads) == 2 * L and all(sorted(ids) == list(range(E)) for ids in reads.values())
    # Per layer and matrix: the int4 experts at int4 and at int8 (the bank's), then the mid ones
    # at int8 once (the mid tier's and the bank's in one call).
    assert quantized == {4: 2 * L, 8: 4 * L}
    assert [t.rows for t in state.tiers] == [L * E - 3 * L, 3 * L] and len(bank) == L
    reads.clear(), quantized.clear()
    again, bank2 = tiers.fallback_and_bank(smoke().experts, 4, 64, "rtn", mid_bits=8, mid=mid, bank_bits=8,
                                           source=ckpt.source)
    assert reads == {} and quantized == {}  # the second start maps what the first converted
    for a, b in zip(jax.tree.leaves((state.tiers, bank)), jax.tree.leaves((again.tiers, bank2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_conversion_in_chunks_is_the_whole_one_and_quantizes_each_expert_at_its_widths_only(monkeypatch):
    ckpt = smoke()
    host = ckpt.experts
    L, E = len(ckpt.config.moe_layers), ckpt.config.num_experts
    mid = np.zeros((L, E), bool)
    mid[:, ::5] = True  # 7 of 32 experts a layer at int8, 25 at int4
    targets = [tiers.Target(4, ~mid), tiers.Target(8, mid)]
    rows = {}
    real = tiers._quantize

    def counting(w, bits, *a):
        rows[bits] = rows.get(bits, 0) + w.shape[0]
        return real(w, bits, *a)

    monkeypatch.setattr(tiers, "_quantize", counting)
    whole = tiers.convert(host, targets, 64, "rtn")
    assert rows == {4: 2 * 25 * L, 8: 2 * 7 * L}
    rows.clear()
    expert_bytes = sum(int(np.prod(s[1:])) for s in host.shapes) * host.dtype.itemsize
    chunked = tiers.convert(host, targets, 64, "rtn", room=3 * expert_bytes * 5 // 4)  # three experts a call
    # Reads of three: 25 int4 experts in 9 (the last padded with two repeats), 7 int8 ones in 3.
    assert rows == {4: 2 * 27 * L, 8: 2 * 9 * L}
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_target_converted_beside_one_from_the_cache_is_the_one_converted_alone(cache):
    ckpt = smoke()
    L, E = len(ckpt.config.moe_layers), ckpt.config.num_experts
    mid = np.zeros((L, E), bool)
    mid[:, 1::4] = True
    lo, hi = tiers.Target(4, ~mid), tiers.Target(8, mid)
    (alone,) = tiers.convert(ckpt.experts, [hi], 64, "rtn")  # no cache
    tiers.convert(ckpt.experts, [lo], 64, "rtn", source=ckpt.source)
    _, beside = tiers.convert(smoke().experts, [lo, hi], 64, "rtn", source=ckpt.source)  # lo mapped, hi converted
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(beside)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def mapping_of(address: int) -> str | None:
    """The file mapped at `address` in this process (/proc/self/maps), or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, *rest = line.split()
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return rest[4] if len(rest) > 4 else None
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_a_command_serves_big_buffers_from_its_heap_so_freed_pages_are_reused():
    """Fresh pages cost a fault each (up to 2.7 s a GB on the CPU machines): after
    `reuse_freed_memory` (which the commands call) a 100 MB buffer comes from the heap, whose
    freed memory the next buffer reuses, not from a mapping of its own returned on free."""
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from dynaexq_jax.runtime import host_memory
        if sys.argv[1] == "reuse":
            assert host_memory.reuse_freed_memory()
        a = np.ones(100 << 20, np.uint8)
        for line in open("/proc/self/maps"):
            span, *rest = line.split()
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= a.ctypes.data < hi:
                print(rest[4] if len(rest) > 4 else "anonymous")
        """)
    where = {how: subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, check=True).stdout
             for how in ("reuse", "default")}
    assert where == {"reuse": "[heap]\n", "default": "anonymous\n"}


def test_a_warm_cpu_tier_is_the_mapped_cache_file(cache):
    ckpt = smoke()
    packed = tiers.packed_tier(ckpt.experts, 4, 64, "rtn", source=ckpt.source)
    warm = tiers.packed_tier(smoke().experts, 4, 64, "rtn", source=ckpt.source)
    (entry,) = cache.glob("*/int4-*")
    assert mapping_of(warm.gate_up.packed.unsafe_buffer_pointer()) == str(entry / store.ARRAYS)  # no copy
    np.testing.assert_array_equal(np.asarray(warm.gate_up.packed), np.asarray(packed.gate_up.packed))


def test_an_accelerators_tier_is_written_behind_in_row_blocks_and_read_back_whole(cache, calls, monkeypatch):
    """Off the CPU a converted tier goes to the cache from a background thread once it is on the
    device (the engine does not wait for the disk): here the CPU takes that path, in blocks of
    a few rows (the last one clamped), and a second start maps what it wrote."""
    _, quantized = calls
    monkeypatch.setattr(tiers, "MAP_CPU_TIERS", False)
    monkeypatch.setattr(tiers, "BEHIND_BYTES", 5 * 1024)
    ckpt = smoke()
    packed = tiers.packed_tier(ckpt.experts, 4, 64, "rtn", source=ckpt.source)
    tiers.wait_for_cache()
    quantized.clear()
    warm = tiers.packed_tier(smoke().experts, 4, 64, "rtn", source=ckpt.source)
    assert quantized == {} and len(list(cache.glob("*/int4-*"))) == 1
    for a, b in zip(jax.tree.leaves((warm.gate_up, warm.down)), jax.tree.leaves((packed.gate_up, packed.down))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_process_exits_only_once_its_tier_written_behind_is_in_the_cache(cache):
    """The cache is written behind the engine: a run that ends first still leaves the entry."""
    code = ("import jax.numpy as jnp\n"
            "from dynaexq_jax.io import preset\n"
            "from dynaexq_jax.policies import tiers\n"
            "tiers.MAP_CPU_TIERS = False\n"
            "ckpt = preset.random_checkpoint(preset.preset_config('qwen3-moe-smoke'), jnp.float32, routing_skew=1.0)\n"
            "tiers.packed_tier(ckpt.experts, 4, 64, 'rtn', source=ckpt.source)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (entry,) = cache.glob("*/int4-*")
    assert (entry / "meta.json").is_file() and not list(cache.glob("*/*.tmp*"))


def test_a_preset_is_cached_by_the_recipe_of_its_experts(cache, calls):
    _, quantized = calls
    tiers.packed_tier(smoke().experts, 4, 64, "rtn", source=smoke().source)
    quantized.clear()
    other_skew = preset.random_checkpoint(preset.preset_config("qwen3-moe-smoke"), jnp.float32, routing_skew=0.0)
    tiers.packed_tier(other_skew.experts, 4, 64, "rtn", source=other_skew.source)
    assert quantized == {}  # the routers' skew does not change the experts
    tiers.packed_tier(smoke(seed=1).experts, 4, 64, "rtn", source=smoke(seed=1).source)
    assert quantized == {4: 2 * 4}  # another seed, other experts


def test_sampled_errors_follow_the_exact_ones(monkeypatch):
    """The auto tiers' errors come from every `error_stride`-th column: on wide matrices they
    match the errors over every column closely, and rank the widths the same."""
    monkeypatch.setattr(tiers, "ERROR_COLUMNS", 16)
    ckpt = smoke()
    sampled = tiers.quant_errors(ckpt.experts, (2, 4, 8), 64, "rtn")
    monkeypatch.setattr(tiers, "ERROR_COLUMNS", 10**9)  # stride 1: every column
    exact = tiers.quant_errors(ckpt.experts, (2, 4, 8), 64, "rtn")
    for b in (2, 4, 8):
        np.testing.assert_allclose(sampled[b], exact[b], rtol=0.15)
    assert np.all(sampled[2] > sampled[4]) and np.all(sampled[4] > sampled[8])


def exported(tmp_path, layers: int, experts: int, hidden: int) -> tuple:
    hf = dict(SMOKE, num_hidden_layers=layers, num_experts=experts, hidden_size=hidden, moe_intermediate_size=hidden)
    cfg = registry.adapter_for(hf).config_from_hf(hf)
    ckpt = preset.random_checkpoint(cfg, jnp.bfloat16)
    path = hf_export.save_checkpoint(tmp_path / "ckpt", cfg, ckpt.params, ckpt.experts, eos_token_id=0)
    layer_bytes = experts * 3 * hidden * hidden * 2
    return path, layer_bytes


def test_conversion_streams_and_holds_less_than_a_layer_of_host_memory(tmp_path, cache):
    path, layer = exported(tmp_path, layers=6, experts=8, hidden=512)  # 12 MB of experts a layer, 72 MB in all
    ckpt = loader.load(path, jnp.bfloat16)
    tracemalloc.start()
    try:
        tiers.fallback_and_bank(ckpt.experts, 4, 64, "rtn", bank_bits=8, source=ckpt.source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The host holds an expert and a layer's quantized copies for the cache at a time (the layer
    # itself is assembled on the device); loading every layer, as before, held 6.
    assert peak < layer, (peak, layer)


def test_every_step_compiled_ahead_matches_the_state_its_policy_builds():
    ckpt = smoke()
    L = len(ckpt.config.moe_layers)
    mid = tuple((l, e) for l in range(L) for e in (0, 5))
    cases = [("full", None, DynaExqOptions()), ("static", "30MB", DynaExqOptions()),
             ("dynaexq", "40MB", DynaExqOptions()), ("dynaexq", "40MB", DynaExqOptions(hi_dtype="int8")),
             ("dynaexq", "40MB", DynaExqOptions(mid_bits=8, mid_experts=mid)), ("dynaexq", None, DynaExqOptions())]
    for policy, budget, opts in cases:
        b = budget_lib.parse_size(budget) if budget else None
        eng, plan = build_engine(ckpt, policy, budget=b, opts=opts, **SHAPE)
        group = budget_lib.expert_group_size(ckpt.config, opts.group_size)
        shape = tiers.abstract_state(ckpt.experts, policy, plan, dataclasses.replace(opts, group_size=group))
        real = eng.policy.experts
        assert jax.tree.structure(shape) == jax.tree.structure(real), (policy, budget, opts)
        assert [(a.shape, a.dtype) for a in jax.tree.leaves(shape)] == \
            [(a.shape, a.dtype) for a in jax.tree.leaves(real)], (policy, budget, opts)


def test_a_run_takes_its_steps_from_the_background_compile(monkeypatch):
    compiled = []
    real = Engine._compile

    def spy(self, name, fn, *args, **static):
        before = dict(self._ahead._steps) if self._ahead else {}
        out = real(self, name, fn, *args, **static)
        compiled.append((name, len(before) > len(self._ahead._steps)))
        return out

    monkeypatch.setattr(Engine, "_compile", spy)
    eng, _ = build_engine(smoke(), "dynaexq", budget=budget_lib.parse_size("40MB"), request=Request(1, 16, 8), **SHAPE)
    eng.generate([[1, 2, 3, 4]], 8)
    assert ("prefill", True) in compiled and ("decode", True) in compiled


def test_every_expert_at_full_precision_wins_auto_tiers_when_it_fits(moe_checkpoint):
    path, model = moe_checkpoint
    ckpt = loader.load(path, jnp.float32)
    auto = DynaExqOptions(lo_bits="auto", hi_dtype="auto")
    opts, choice = build_lib.auto_tiers(ckpt, auto, budget=budget_lib.parse_size("4GB"), **SHAPE)
    L, E = len(ckpt.config.moe_layers), ckpt.config.num_experts
    assert opts.hi_dtype == "bfloat16" and choice.slots == L * E  # not int8 static, however small its error
    eng, plan = build_engine(ckpt, "dynaexq", budget=budget_lib.parse_size("4GB"), opts=opts, **SHAPE)
    prompt = [3, 14, 15, 92, 65]
    gen = eng.generate([prompt], 8, eos_token_ids=())
    import torch

    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert gen.tokens[0] == want and gen.stats["hi_hit_rate"] == 1.0
    assert eng.policy.observe_every is None  # nothing can move: no routing statistics are read


def test_a_run_whose_host_memory_cannot_fit_is_refused_before_converting(monkeypatch):
    monkeypatch.setattr(build_lib, "available_host_memory", lambda: 1000)
    refusal = r"needs .* of host memory .* and 1.00 KB is available; free host memory"
    with pytest.raises(budget_lib.BudgetError, match=refusal):
        build_engine(smoke(), "dynaexq", budget=budget_lib.parse_size("40MB"), **SHAPE)


def test_a_checkpoints_experts_made_on_the_device_are_its_layers_and_a_nan_is_refused(tmp_path):
    """Conversion reads and promotions copy a checkpoint's tensors as stored ([out, in]) and
    put them in our layout on the device."""
    path, _ = exported(tmp_path, layers=1, experts=4, hidden=256)
    ckpt = loader.load(path, jnp.float32)  # stored bf16: cast on the device too
    ids = np.array([3, 1, 1])
    for source in (ckpt.experts.gate_up, ckpt.experts.down):
        np.testing.assert_array_equal(np.asarray(source.on_device(0, experts=ids)), source[0][ids])
    bank = tiers.host_bank(ckpt.experts)
    promoted = bank.arrive(swap.stage(bank[0, 2]))
    for a, b in zip(promoted, ckpt.experts.expert(0, 2)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), b)
    tensors = load_file(path / "model.safetensors")
    name = next(k for k in tensors if k.endswith("experts.1.up_proj.weight"))
    tensors[name][5, 7] = float("nan")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(loader.CheckpointError, match="NaN or Inf"):
        loader.load(path, jnp.float32).experts.gate_up.on_device(0, experts=ids)


def test_a_checkpoints_column_sample_reads_rows_of_its_files_and_equals_the_layers_columns(tmp_path):
    path, _ = exported(tmp_path, layers=1, experts=4, hidden=256)
    ckpt = loader.load(path, jnp.bfloat16)
    for source in (ckpt.experts.gate_up, ckpt.experts.down):
        before = ckpt.bytes_read
        sample = source.columns(0, 4)
        assert ckpt.bytes_read - before == sample.nbytes  # a quarter of the layer's bytes, no more
        np.testing.assert_array_equal(sample, source[0][..., ::4])
