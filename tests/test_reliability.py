"""Nothing bad gets through quietly: damaged copies of a small checkpoint, and hostile flags.

Each refusal is exit code 2 and one `error:` line naming the file or flag and the fix, and
leaves nothing behind: no file under the test's folder (checkpoint copy, cache, outputs) is
created, changed or half-written. A damaged or unwritable cache is a warning and a rebuild or
an uncached run with the same tokens. Ctrl-C, a closed pipe and a full context end a reply, not
the session, and never print a traceback.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dynaexq_jax.cli import bench, generate
from dynaexq_jax.cli import eval as eval_cli
from dynaexq_jax.eval import evaluate
from dynaexq_jax.io import loader, preset, store
from dynaexq_jax.models.registry import read_config
from dynaexq_jax.policies.hotness import HotnessTracker
from dynaexq_jax.runtime import engine
from dynaexq_jax.runtime.build import plan_for

from conftest import script

ROOT = Path(__file__).resolve().parent.parent

WEIGHTS = "model.safetensors"


@pytest.fixture
def ckpt(tmp_path, moe_checkpoint, monkeypatch):
    """A private copy of the tiny checkpoint; the converted-expert cache on, in the test's folder."""
    path = tmp_path / "ckpt"
    path.mkdir()
    for f in moe_checkpoint[0].iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("DYNAEXQ_CACHE", "1")
    monkeypatch.setenv("DYNAEXQ_CACHE_DIR", str(tmp_path / "cache"))
    return path


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below `root` with its size and mtime: equal before and after = nothing written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def cli(capsys, main, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, root: Path, main, argv, needle: str) -> str:
    before = files_under(root)
    code, out, err = cli(capsys, main, *argv)
    assert (code, out) == (2, ""), err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err, err
    assert files_under(root) == before  # nothing written, nothing half-written
    return err


# ----------------------------------------------------------------------------- damage


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensor(path: Path, name: str, value: float) -> None:
    tensors = {k: v.copy() for k, v in load_file(path / WEIGHTS).items()}
    tensors[name].flat[0] = value
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def edit_bytes(path: Path, fname: str, edit) -> None:
    (path / fname).write_bytes(edit((path / fname).read_bytes()))


def write(fname: str, text: str | bytes):
    def damage(path):
        f = path / fname
        f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text)
    return damage


def index_text(path: Path, extra: str = "") -> str:
    """A shard index for the single file, as text (so it can say things JSON objects cannot)."""
    entries = [f'"{name}": "{WEIGHTS}"' for name in loader.read_header(path / WEIGHTS)]
    return '{"metadata": {}, "weight_map": {' + ", ".join(entries + ([extra] if extra else [])) + "}}"


def index_with_a_wrong_shard(path: Path) -> None:
    save_file({"other": np.zeros(4, np.float32)}, path / "extra.safetensors")
    doc = json.loads(index_text(path))
    doc["weight_map"]["lm_head.weight"] = "extra.safetensors"
    (path / loader.INDEX).write_text(json.dumps(doc))


DAMAGE = {
    # 1. silent garbage before: weights or a config that ran and printed nonsense
    "nan-in-an-expert": (lambda p: edit_tensor(p, "model.layers.1.mlp.experts.3.down_proj.weight", np.nan),
                         "'model.layers.1.mlp.experts.3.down_proj.weight'"),
    "inf-in-a-router": (lambda p: edit_tensor(p, "model.layers.0.mlp.gate.weight", np.inf), "mlp.gate.weight"),
    "nan-in-a-norm": (lambda p: edit_tensor(p, "model.norm.weight", np.nan), "'model.norm.weight' in"),
    "negative-rms-norm-eps": (lambda p: edit_config(p, rms_norm_eps=-1e-6), "rms_norm_eps=-1e-06"),
    "zero-rope-theta": (lambda p: edit_config(p, rope_parameters={"rope_type": "default", "rope_theta": 0}),
                        "rope_theta=0"),
    "fewer-layers-than-weights": (lambda p: edit_config(p, num_hidden_layers=1),
                                  "config.json does not use, e.g. 'model.layers.1."),
    "more-layers-than-weights": (lambda p: edit_config(p, num_hidden_layers=3), "'model.layers.2."),
    "tied-beside-an-lm-head": (lambda p: edit_config(p, tie_word_embeddings=True), "'lm_head.weight'"),
    "zero-experts-per-token": (lambda p: edit_config(p, num_experts_per_tok=0), "num_experts_per_tok=0"),
    "too-many-experts-per-token": (lambda p: edit_config(p, num_experts_per_tok=9), "num_experts_per_tok=9"),
    "dense-layer-out-of-range": (lambda p: edit_config(p, mlp_only_layers=[5]), "mlp_only_layers=[5]"),
    # 2. tracebacks before
    "truncated-safetensors": (lambda p: edit_bytes(p, WEIGHTS, lambda b: b[:-100]), "is damaged"),
    "empty-safetensors": (write(WEIGHTS, b""), "too short for a safetensors header"),
    "corrupt-safetensors-header": (lambda p: edit_bytes(p, WEIGHTS, lambda b: b[:8] + b"\x00" * 32 + b[40:]),
                                   "header is not valid JSON"),
    "unknown-dtype-in-header": (lambda p: edit_bytes(p, WEIGHTS, lambda b: b.replace(b'"F32"', b'"F99"', 1)),
                                "is stored as 'F99'"),
    "integer-dtype-in-header": (lambda p: edit_bytes(p, WEIGHTS, lambda b: b.replace(b'"F32"', b'"I32"', 1)),
                                "is stored as 'I32'"),
    "index-lists-a-tensor-twice": (lambda p: (p / loader.INDEX).write_text(
        index_text(p, f'"lm_head.weight": "{WEIGHTS}"')), "'lm_head.weight' twice"),
    "index-not-json": (write(loader.INDEX, '{"weight_map": {'), "is not valid JSON"),
    "index-without-weight-map": (write(loader.INDEX, '{"metadata": {}}'), "has no weight_map"),
    "index-puts-a-tensor-in-the-wrong-shard": (index_with_a_wrong_shard, "which does not hold it"),
    "corrupt-tokenizer": (write("tokenizer.json", '{"model": '), "tokenizer.json cannot be read"),
    "corrupt-generation-config": (write("generation_config.json", "{"), "generation_config.json is not valid JSON"),
    "eos-not-a-token-id": (write("generation_config.json", '{"eos_token_id": "</s>"}'), "eos_token_id='</s>'"),
    "config-is-a-list": (write("config.json", "[]"), "holds a JSON list"),
    "config-not-utf8": (write("config.json", b'{"model_type": "\xff"}'), "is not UTF-8 text"),
    "hidden-size-a-string": (lambda p: edit_config(p, hidden_size="64"), "hidden_size='64'"),
    "hidden-layers-a-float": (lambda p: edit_config(p, num_hidden_layers=2.0), "num_hidden_layers=2.0"),
    "zero-kv-heads": (lambda p: edit_config(p, num_key_value_heads=0), "num_key_value_heads=0"),
    "zero-sparse-step": (lambda p: edit_config(p, decoder_sparse_step=0), "decoder_sparse_step=0"),
    "zero-layers": (lambda p: edit_config(p, num_hidden_layers=0), "num_hidden_layers=0"),
    "tie-a-string": (lambda p: edit_config(p, tie_word_embeddings="false"), "tie_word_embeddings='false'"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_one_error_line(capsys, tmp_path, ckpt, case):
    damage, needle = DAMAGE[case]
    damage(ckpt)
    assert_refused(capsys, tmp_path, generate.main, ["--model", ckpt, "--max-new-tokens", 2], needle)


def test_a_bad_index_fails_a_dry_run_before_its_plan(capsys, tmp_path, ckpt):
    write(loader.INDEX, "{")(ckpt)
    assert_refused(capsys, tmp_path, generate.main, ["--model", ckpt, "--dry-run"], "is not valid JSON")


@pytest.mark.parametrize("sampling", [[], ["--temperature", 0.8]], ids=["greedy", "sampled"])
def test_logits_that_overflow_are_an_error_naming_the_step(capsys, tmp_path, ckpt, sampling):
    """Finite weights, non-finite logits: a final norm of 3e38 overflows the LM head."""
    tensors = {k: v.copy() for k, v in load_file(ckpt / WEIGHTS).items()}
    tensors["model.norm.weight"][:] = 3e38
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "pt"})
    err = assert_refused(capsys, tmp_path, generate.main,
                         ["--model", ckpt, "--max-new-tokens", 4, "--policy", "full", *sampling], "NaN or Inf")
    assert "generation step 0" in err


def test_non_finite_logits_mid_generation_name_their_step(moe_checkpoint):
    """The token the first step samples is given a NaN embedding: the prompt runs clean, and the
    first decode step, which reads that token, must fail, naming step 1."""
    ckpt = loader.load(moe_checkpoint[0], jnp.float32)
    eng = engine.Engine(ckpt)
    prompt = [5, 6, 7]
    first = eng.generate([prompt], 3, eos_token_ids=()).tokens[0][0]
    assert first not in prompt
    table = eng.params["embed_tokens"]["embedding"]
    eng.params = {**eng.params, "embed_tokens": {"embedding": table.at[first].set(jnp.nan)}}
    with pytest.raises(engine.NonFiniteError, match="generation step 1 "):
        eng.generate([prompt], 3, eos_token_ids=())


# ----------------------------------------------------------------------------- hostile flags


def profile(text: str | None = None, shape=None):
    """--hotness FILE holding `text`, or a real profile of `shape`."""
    def setup(root: Path) -> list:
        f = root / "profile.json"
        if shape:
            HotnessTracker(*shape, half_life_steps=100).save(f)
        else:
            f.write_text(text)
        return ["--hotness", f]
    return setup


def budget_without_slots(root: Path) -> list:
    """A budget that holds the fallbacks and no slot: dynaexq then runs static and learns nothing.
    (Explicit tiers: auto ones are known only once the experts are read.)"""
    cfg = read_config(root / "ckpt")
    plan = plan_for(cfg, "dynaexq", budget=None, batch=1, longest_prompt=1, max_new_tokens=2, dtype_itemsize=2)
    return ["--budget", plan.minimum, "--save-hotness", root / "p.json", "--lo-bits", 4, "--hi-dtype", "bfloat16"]


FLAGS = {
    "half-life-zero": (["--half-life", 0], "--half-life must be"),
    "half-life-nan": (["--half-life", "nan"], "--half-life must be"),
    "rebalance-every-zero": (["--rebalance-every", 0], "--rebalance-every must be >= 1"),
    "group-size-below-8": (["--group-size", 4], "--group-size must be >= 8"),
    "seed-past-64-bits": (["--seed", 2**64], "seed must fit in 64 bits"),
    "temperature-nan": (["--temperature", "nan"], "temperature must be"),
    "context-zero": (["--interactive", "--context", 0], "--context must be >= 2"),
    "context-without-room-for-a-message": (["--interactive", "--context", 8, "--max-new-tokens", 8],
                                           "leaves no room for a message"),
    "prompt-not-utf8": (["--prompt", "caf\udce9"], "--prompt holds bytes that are not UTF-8"),
    "system-not-utf8": (["--system", "\udcff"], "--system holds bytes that are not UTF-8"),
    "hotness-corrupt": (profile("{not json"), "is not valid JSON"),
    "hotness-empty": (profile(""), "is not valid JSON"),
    "hotness-foreign": (profile('{"model_type": "qwen3_moe"}'), "no field 'layers'"),
    "hotness-of-another-model": (profile(shape=(48, 128)), "record a profile with this model"),
    "hotness-with-another-policy": (["--policy", "full", "--hotness", "x.json"], "apply to --policy dynaexq"),
    "save-hotness-into-a-missing-folder": (lambda root: ["--save-hotness", root / "nope" / "p.json", "--json"],
                                           "does not exist; create it first"),
    "save-hotness-onto-a-folder": (lambda root: ["--save-hotness", root], "is a folder"),
    "save-hotness-without-slots": (budget_without_slots, "no high-precision slot"),
    "prompt-over-the-context-with-a-budget": (["--prompt", "x " * 600, "--budget", "1MB"],
                                              "the prompt is longer than the context"),
}


@pytest.mark.parametrize("case", sorted(FLAGS))
def test_a_hostile_flag_is_refused_before_any_weight_is_read(capsys, tmp_path, ckpt, monkeypatch, case):
    argv, needle = FLAGS[case]
    argv = argv(tmp_path) if callable(argv) else argv
    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("flags must be checked before loading"))
    err = assert_refused(capsys, tmp_path, generate.main, ["--model", ckpt, "--max-new-tokens", 2, *argv], needle)
    assert "minimum" not in err  # the context is the problem, not the budget


def test_non_utf8_on_interactive_stdin_is_one_error_line(capsys, tmp_path, ckpt, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n")))
    assert_refused(capsys, tmp_path, generate.main,
                   ["--model", ckpt, "--interactive", "--policy", "full", "--context", 64, "--max-new-tokens", 4],
                   "line 1 of stdin")


BINARY = b"ok\n\xff\xfe\x00 not text"  # its first bad byte, 0xff, at offset 3


def binary(folder: Path, name: str = "input.bin") -> Path:
    f = folder / name
    f.write_bytes(BINARY)
    return f


def calibrate(argv):
    return script("calibrate").main(argv)


# Every text a user hands the tool, as a file that is not UTF-8: (command, its argv from the test's
# folder and the checkpoint copy, what the error names the file by).
TEXT_INPUTS = {
    "eval --ppl": (eval_cli.main, lambda root, ck: ["--model", ck, "--ppl", binary(root)], "--ppl"),
    "eval --mc": (eval_cli.main, lambda root, ck: ["--model", ck, "--mc", binary(root, "mc.jsonl")], "--mc"),
    "eval --em": (eval_cli.main, lambda root, ck: ["--model", ck, "--em", binary(root, "em.jsonl")], "--em"),
    "eval --calibration": (eval_cli.main, lambda root, ck: ["--model", ck, "--calibration", binary(root)],
                           "--calibration"),
    "calibrate --text": (calibrate, lambda root, ck: ["--model", ck, "--text", binary(root), "--out", root / "cal"],
                         "--text"),
    "generate --hotness": (generate.main, lambda root, ck: ["--model", ck, "--hotness", binary(root)],
                           "hotness profile"),
    "config.json": (generate.main, lambda root, ck: ["--model", binary(ck, "config.json").parent, "--dry-run"],
                    "config.json"),
    "shard index": (generate.main, lambda root, ck: ["--model", binary(ck, loader.INDEX).parent, "--dry-run"],
                    loader.INDEX),
    "tokenizer.json": (generate.main, lambda root, ck: ["--model", binary(ck, "tokenizer.json").parent],
                       "tokenizer.json"),
    "tokenizer_config.json": (generate.main, lambda root, ck: ["--model", binary(ck, "tokenizer_config.json").parent],
                              "tokenizer_config.json"),
    "chat_template.jinja": (generate.main, lambda root, ck: ["--model", binary(ck, "chat_template.jinja").parent],
                            "chat_template.jinja"),
}


@pytest.mark.parametrize("case", sorted(TEXT_INPUTS))
def test_a_text_input_that_is_not_utf8_is_one_line_naming_the_file_and_the_byte(capsys, tmp_path, ckpt, monkeypatch,
                                                                                case):
    main, argv, name = TEXT_INPUTS[case]
    argv = argv(tmp_path, ckpt)
    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("text is read before any weight"))
    err = assert_refused(capsys, tmp_path, main, argv, "is not UTF-8 text (byte 0xff at offset 3)")
    assert name in err


def test_a_tokenizer_past_the_vocabulary_is_refused(capsys, tmp_path, ckpt):
    edit_config(ckpt, vocab_size=200)  # the tokenizer has 300 tokens; the weights are cut to match
    tensors = {k: (v[:200] if k in ("model.embed_tokens.weight", "lm_head.weight") else v)
               for k, v in load_file(ckpt / WEIGHTS).items()}
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "pt"})
    assert_refused(capsys, tmp_path, generate.main, ["--model", ckpt, "--prompt", "the quick brown fox zebra"],
                   "does not belong to this model")


@pytest.fixture
def ppl_task(tmp_path):
    f = tmp_path / "ppl.jsonl"
    f.write_text(json.dumps({"text": "def f(x):\n    return x + 1\n" * 4}) + "\n")
    return f


@pytest.mark.parametrize("argv, needle", [
    (lambda root: ["--json", root / "missing" / "results.json"], "does not exist; create it first"),
    (lambda root: ["--group-size", 0], "--group-size must be >= 8"),
    (lambda root: ["--hotness", root / "ckpt" / "config.json"], "is not a hotness profile"),
], ids=["json-into-a-missing-folder", "group-size-zero", "hotness-foreign"])
def test_eval_refuses_bad_flags_before_loading(capsys, tmp_path, ckpt, ppl_task, monkeypatch, argv, needle):
    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("flags must be checked before loading"))
    assert_refused(capsys, tmp_path, eval_cli.main, ["--model", ckpt, "--ppl", ppl_task, *argv(tmp_path)], needle)


def test_eval_checks_every_runs_budget_before_the_first_run(capsys, tmp_path, ckpt, ppl_task, monkeypatch):
    monkeypatch.setattr(evaluate, "build_engine", lambda *a, **k: pytest.fail("no run may start"))
    assert_refused(capsys, tmp_path, eval_cli.main,
                   ["--model", ckpt, "--ppl", ppl_task, "--policies", "full,static", "--budgets", "none,1KB",
                    "--window", 32, "--batch-size", 2, "--dtype", "float32"], "run static int4 @1KB: budget")


@pytest.mark.parametrize("argv, needle", [
    (["--batch-sizes", "1,8,x"], "--batch-sizes '1,8,x'"),
    (["--budget", "20GB", "--batch-sizes", "1,8,100000"], "fits none of --policies"),
    (["--budget", "1GB"], "fits none of --policies"),
])
def test_bench_checks_a_30b_plan_before_building_the_preset(capsys, monkeypatch, argv, needle):
    monkeypatch.setattr(preset, "random_checkpoint", lambda *a, **k: pytest.fail("no weights before the plan fits"))
    code = bench.main(["--preset", "qwen3-30b-a3b", *argv])
    last = capsys.readouterr().err.splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and needle in last


# ----------------------------------------------------------------------------- the converted-expert cache


def static_run(capsys, ckpt, *extra) -> tuple[list[int], str]:
    """Every expert at int4 from the cache, so a wrong cached weight would change the tokens."""
    code, out, err = cli(capsys, generate.main, "--model", ckpt, "--prompt", "def f", "--max-new-tokens", 8,
                         "--policy", "static", "--dtype", "float32", "--json", *extra)
    assert code == 0, err
    return json.loads(out)["outputs"][0]["token_ids"], err


@pytest.fixture
def uncached_tokens(capsys, ckpt, monkeypatch):
    monkeypatch.setenv("DYNAEXQ_CACHE", "0")
    tokens, _ = static_run(capsys, ckpt)
    monkeypatch.setenv("DYNAEXQ_CACHE", "1")
    return tokens


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("*/int4-*"))


def test_the_cache_lives_in_the_users_cache_folder(capsys, tmp_path, ckpt, uncached_tokens, monkeypatch):
    monkeypatch.delenv("DYNAEXQ_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = files_under(ckpt)
    tokens, err = static_run(capsys, ckpt)
    assert tokens == uncached_tokens and "warning" not in err
    assert len(entries(tmp_path / "xdg" / "dynaexq")) == 1
    assert files_under(ckpt) == before  # a read-only model store works: nothing is written beside the weights


def flip_bytes(entry: Path) -> None:
    data = entry / store.ARRAYS
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))


def truncate(entry: Path) -> None:
    data = entry / store.ARRAYS
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


@pytest.mark.parametrize("damage", [flip_bytes, truncate, lambda e: (e / "meta.json").unlink()],
                         ids=["flipped-bytes", "truncated-data-file", "no-meta-json"])
def test_a_damaged_cache_entry_is_a_warning_and_rebuilt(capsys, tmp_path, ckpt, uncached_tokens, damage):
    static_run(capsys, ckpt)
    (entry,) = entries(tmp_path / "cache")
    damage(entry)
    tokens, err = static_run(capsys, ckpt)
    assert tokens == uncached_tokens
    assert err.startswith("warning: the cache entry") and "is damaged" in err and "rebuilding it" in err
    assert entries(tmp_path / "cache") == [entry] and (entry / "meta.json").is_file()
    tokens, err = static_run(capsys, ckpt)  # the rebuilt entry verifies
    assert tokens == uncached_tokens and "warning" not in err


def test_an_unwritable_cache_is_a_warning_and_an_uncached_run(capsys, tmp_path, ckpt, uncached_tokens, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DYNAEXQ_CACHE_DIR", str(blocker / "cache"))  # cannot be made: a file is in the way
    tokens, err = static_run(capsys, ckpt)
    assert tokens == uncached_tokens
    assert "warning: cannot write the expert cache" in err and "running without it" in err


def test_a_full_disk_is_a_warning_and_leaves_no_temporary(capsys, tmp_path, ckpt, uncached_tokens, monkeypatch):
    monkeypatch.setattr(store.os, "statvfs", lambda path: types.SimpleNamespace(f_bavail=0, f_frsize=4096))
    tokens, err = static_run(capsys, ckpt)
    assert tokens == uncached_tokens and "No space left on device" in err and "running without it" in err
    assert not list((tmp_path / "cache").rglob(".tmp-*")) and entries(tmp_path / "cache") == []


def test_weights_changed_in_place_are_not_served_from_the_old_entry(capsys, tmp_path, ckpt, monkeypatch):
    static_run(capsys, ckpt)
    (old,) = entries(tmp_path / "cache")
    st = (ckpt / WEIGHTS).stat()
    tensors = {k: v.copy() for k, v in load_file(ckpt / WEIGHTS).items()}
    for k in tensors:
        if ".mlp.experts." in k:
            tensors[k] *= -1  # same size, other experts
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "pt"})
    os.utime(ckpt / WEIGHTS, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (ckpt / WEIGHTS).stat().st_size == st.st_size
    tokens, _ = static_run(capsys, ckpt)
    monkeypatch.setenv("DYNAEXQ_CACHE", "0")
    assert tokens == static_run(capsys, ckpt)[0]
    assert entries(tmp_path / "cache") != [old]


# ----------------------------------------------------------------------------- interactive sessions and signals


def interrupt_on_call(monkeypatch, n: int):
    """Ctrl-C as the `n`-th streamed token arrives (where Python raises KeyboardInterrupt)."""
    calls = [0]
    real = generate.Streamer.__call__

    def streamer(self, ids):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real(self, ids)

    monkeypatch.setattr(generate.Streamer, "__call__", streamer)


def test_ctrl_c_in_a_plain_run_exits_130_after_what_was_streamed(capsys, ckpt, monkeypatch):
    interrupt_on_call(monkeypatch, 4)
    code, out, err = cli(capsys, generate.main, "--model", ckpt, "--prompt", "def f", "--max-new-tokens", 20,
                         "--policy", "full")
    assert code == 130 and err == "interrupted\n"
    assert out.startswith("def f") and out.endswith("\n") and len(out) > len("def f\n")


def test_ctrl_c_in_interactive_drops_the_reply_and_returns_to_the_prompt(capsys, ckpt, monkeypatch):
    interrupt_on_call(monkeypatch, 2)
    monkeypatch.setattr(sys, "stdin", io.StringIO("the quick\nbrown fox\n"))
    code, out, err = cli(capsys, generate.main, "--model", ckpt, "--interactive", "--policy", "full",
                         "--context", 64, "--max-new-tokens", 4)
    lines = err.splitlines()
    assert code == 0 and lines[0] == "note: interrupted; the turn is dropped" and len(lines) == 2
    assert lines[1].endswith("reused 0 cached tok")  # the second turn starts a clean cache


def test_a_full_context_drops_the_oldest_turns_and_keeps_the_session(capsys, ckpt, monkeypatch):
    line, too_long = "zebra yak walrus", "x " * 100  # 15 and 101 tokens
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{line}\n{line}\n{line}\n{too_long}\n{line}\n"))
    code, out, err = cli(capsys, generate.main, "--model", ckpt, "--interactive", "--policy", "full",
                         "--context", 40, "--max-new-tokens", 8)
    assert code == 0, err
    assert "note: the context (40 tokens) is full; dropped the" in err
    assert "on its own; not sent" in err
    assert sum("tok/s" in ln for ln in err.splitlines()) == 4  # every other message was answered


def cli_process(ckpt: Path, *argv, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", str(ckpt),
                             *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_a_closed_pipe_exits_quietly(ckpt):
    proc = cli_process(ckpt, "--prompt", "def", "--max-new-tokens", 8, "--policy", "full")
    proc.stdout.close()  # `| head` gone before the first token
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and b"Traceback" not in err and b"BrokenPipe" not in err, err


def test_sigint_stops_a_plain_run_with_130_and_keeps_its_text(ckpt):
    (ckpt / "generation_config.json").write_text('{"eos_token_id": []}')  # no stop token: a long run
    edit_config(ckpt, eos_token_id=None)
    proc = cli_process(ckpt, "--prompt", "def", "--max-new-tokens", 500, "--policy", "full")
    first = proc.stdout.read(3)  # the echoed prompt: generation is under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert first == b"def" and out.endswith(b"\n")
    assert err.endswith(b"interrupted\n") and b"Traceback" not in err
