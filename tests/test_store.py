"""The cache of converted experts: written once, reused (mapped), rebuilt on change, never partial."""

from __future__ import annotations

import json
import os
import subprocess

import jax
import numpy as np
import pytest

from dynaexq_jax.budget import HI_BITS
from dynaexq_jax.experts import quant
from dynaexq_jax.experts.expert_state import HostExperts
from dynaexq_jax.io import store
from dynaexq_jax.policies import tiers

L, E, H, I = 2, 4, 64, 32


@pytest.fixture
def source(tmp_path, monkeypatch):
    """A checkpoint directory (only what the fingerprint reads) and a cache dir outside it."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    cache = tmp_path / "cache"
    monkeypatch.setenv("DYNAEXQ_CACHE_DIR", str(cache))
    monkeypatch.delenv("DYNAEXQ_CACHE", raising=False)
    return ckpt, cache


@pytest.fixture
def quantize_calls(monkeypatch):
    calls = []
    real = quant.quantize

    def counting(w, *args, **kw):
        if w.shape[0] == E:  # a layer's experts (not the shape probe of an empty int8 slot pool)
            calls.append(args[0])
        return real(w, *args, **kw)

    monkeypatch.setattr(quant, "quantize", counting)
    return calls


def experts_from(ckpt, seed=0):
    rng = np.random.default_rng(seed)
    return HostExperts(
        gate_up=[rng.standard_normal((E, H, 2 * I)).astype(np.float32) for _ in range(L)],
        down=[rng.standard_normal((E, I, H)).astype(np.float32) for _ in range(L)],
    )


def build(host, source, lo_bits=4, quant_method="rtn", hi_dtype="bfloat16"):
    """What the dynaexq policy converts in its one pass: the fallbacks, and the host bank of
    high-precision copies."""
    state, hi_layers = tiers.fallback_and_bank(host, lo_bits, 32, quant_method, bank_bits=HI_BITS.get(hi_dtype),
                                               source=source)
    return state, tiers.host_bank(host, hi_layers)


def entries(cache):
    """Every checkpoint's entries (each checkpoint has a folder, which also holds a hash memo)."""
    if not cache.exists():
        return []
    return sorted(p.name for d in cache.iterdir() for p in d.iterdir() if p.name != store.HASHES)


def fallback_leaves(state):
    return [np.asarray(a) for a in jax.tree.leaves(state.tiers)]


def test_second_build_reuses_cache_without_quantizing(source, quantize_calls):
    ckpt, cache = source
    first, _ = build(experts_from(ckpt), ckpt)
    assert len(quantize_calls) == 2 * L and len(entries(cache)) == 1
    quantize_calls.clear()
    again, _ = build(experts_from(ckpt), ckpt)  # a fresh load of the same checkpoint
    assert quantize_calls == []
    for a, b in zip(fallback_leaves(first), fallback_leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_the_next_run_maps_an_entry_this_run_wrote_without_hashing_it_again(source, monkeypatch):
    ckpt, cache = source
    build(experts_from(ckpt), ckpt)
    hashed = []
    real = store._chunk_hash
    monkeypatch.setattr(store, "_chunk_hash", lambda *a: hashed.append(a) or real(*a))
    build(experts_from(ckpt), ckpt)
    assert hashed == []  # the writer's own checksums stand for the first read
    (entry,) = cache.glob("*/int4-*")
    (entry / store.ARRAYS).touch()  # any change to the file since: read and checked again
    build(experts_from(ckpt), ckpt)
    assert hashed


def test_int8_host_copies_are_cached_and_restored_equal(source, quantize_calls):
    ckpt, cache = source
    _, bank = build(experts_from(ckpt), ckpt, hi_dtype="int8")
    assert len(entries(cache)) == 2  # fallback + int8 copies
    quantize_calls.clear()
    _, bank2 = build(experts_from(ckpt), ckpt, hi_dtype="int8")
    assert quantize_calls == []
    for le in [(0, 0), (L - 1, E - 1)]:
        for a, b in zip(np.asarray(bank[le][0].packed), np.asarray(bank2[le][0].packed)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change", [dict(lo_bits=2), dict(quant_method="mse")])
def test_changed_quantization_settings_rebuild(source, quantize_calls, change):
    ckpt, cache = source
    build(experts_from(ckpt), ckpt)
    quantize_calls.clear()
    build(experts_from(ckpt), ckpt, **change)
    assert len(quantize_calls) == 2 * L
    assert len(entries(cache)) == 2  # both settings stay usable


def test_changed_source_rebuilds_and_drops_the_stale_entry(source, quantize_calls):
    ckpt, cache = source
    build(experts_from(ckpt), ckpt)
    old = entries(cache)
    (ckpt / "model.safetensors").write_bytes(b"other weights")
    quantize_calls.clear()
    build(experts_from(ckpt, seed=1), ckpt)
    assert len(quantize_calls) == 2 * L
    assert len(entries(cache)) == 1 and entries(cache) != old


def test_weights_changed_in_place_with_the_same_size_and_mtime_rebuild(source, quantize_calls):
    ckpt, cache = source
    build(experts_from(ckpt), ckpt)
    f = ckpt / "model.safetensors"
    st = f.stat()
    f.write_bytes(b"WEIGHTS")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    quantize_calls.clear()
    build(experts_from(ckpt, seed=1), ckpt)
    assert len(quantize_calls) == 2 * L


def test_a_touched_but_unchanged_source_is_still_a_hit(source, quantize_calls):
    ckpt, cache = source
    build(experts_from(ckpt), ckpt)
    st = (ckpt / "model.safetensors").stat()
    os.utime(ckpt / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    quantize_calls.clear()
    build(experts_from(ckpt), ckpt)
    assert quantize_calls == []  # hashed again, same contents: the entry stands


def test_failure_midway_leaves_no_partial_entry(source, monkeypatch):
    ckpt, cache = source

    def interrupted(*_):
        raise KeyboardInterrupt  # after the arrays are written, before the entry is committed

    monkeypatch.setattr(store.os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(experts_from(ckpt), ckpt)
    assert entries(cache) == []  # no entry, no temporary directory


def test_opt_out_and_experts_without_a_source_write_nothing(source, monkeypatch):
    ckpt, cache = source
    monkeypatch.setenv("DYNAEXQ_CACHE", "0")
    build(experts_from(ckpt), ckpt)
    monkeypatch.delenv("DYNAEXQ_CACHE")
    build(experts_from(ckpt), None)  # e.g. a random preset: no checkpoint directory
    assert entries(cache) == []


def test_temporaries_of_dead_runs_are_removed_and_live_ones_kept(source):
    ckpt, cache = source
    home = store.source_dir(ckpt.resolve())
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = home / f".tmp-int4-x-{store._HOST}-{finished.pid}-abc"  # as a kill -9 leaves it
    live = home / f".tmp-int4-x-{store._HOST}-{os.getpid()}-abc"  # a concurrent run, still writing
    remote = home / ".tmp-int4-x-otherhost-1-abc"  # another machine's run on a shared cache
    for d in (dead, live, remote):
        d.mkdir(parents=True)
    build(experts_from(ckpt), ckpt)
    assert not dead.exists() and live.exists() and remote.exists()


def test_checkpoints_sharing_a_cache_keep_each_others_entries(source, tmp_path, quantize_calls):
    ckpt, cache = source
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((ckpt / "config.json").read_text())
    (other / "model.safetensors").write_bytes(b"other weights")
    build(experts_from(ckpt), ckpt)
    build(experts_from(other, seed=1), other)
    quantize_calls.clear()
    build(experts_from(ckpt), ckpt)
    assert quantize_calls == [] and len(entries(cache)) == 2
    assert store.profile_path(ckpt).parent == store.source_dir(ckpt.resolve())  # the profile sits beside them


def test_rows_put_in_any_order_and_repeated_are_the_array_the_entry_verifies(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "WRITE_AHEAD", 16)  # each write waits for the last: the writing thread keeps up
    a = np.arange(30, dtype=np.float32).reshape(10, 3)
    (tmp_path / "tmp").mkdir()
    w = store.ArrayWriter(tmp_path / "tmp", tmp_path / "entry", {"x": (a.shape, a.dtype)}, {})
    w.put_rows("x", a[[5, 6, 9, 9]], [5, 6, 9, 9])  # a padded block: its last row again
    w.put_rows("x", a[[0, 1, 2, 4, 7, 8]], [0, 1, 2, 4, 7, 8])
    w.put_rows("x", a[3:4], [3])
    with pytest.raises(ValueError, match="rows"):
        w.put_rows("x", a[:2], [4, 2])  # not ascending
    w.written("x", 0, 10)
    np.testing.assert_array_equal(w.commit()["x"], a)
    np.testing.assert_array_equal(store.read_arrays(tmp_path / "entry")["x"], a)
