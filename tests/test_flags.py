"""The commands' flags: a flag that several commands take is one flag, declared once in
`dynaexq_jax.launch.options`, with the same name, default, values and error in each."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from dynaexq_jax import launch
from dynaexq_jax.cli import bench, generate, serve
from dynaexq_jax.cli import eval as eval_cli

COMMANDS = {"generate": generate, "serve": serve, "eval": eval_cli, "bench": bench}
CONCERNS = (launch.ModelOptions, launch.PlanOptions, launch.PolicyOptions, launch.SamplingOptions, launch.MeshOptions,
            launch.BigLittleOptions, launch.BigLittleSweep, launch.PromptOptions, launch.OutputOptions)

# A name some commands give a flag of their own job, and which of them do: the rest take the
# library's flag of that name (or none).
OWN_MEANING = {
    "--model": {"bench"},  # a checkpoint, else --preset's random weights: no default
    "--lo-bits": {"eval", "bench"},  # the widths a sweep runs (eval: a comma list; bench: no auto)
    "--json": {"eval", "bench"},  # a results file (generate, serve: JSON on stdout)
    "--max-new-tokens": {"eval"},  # greedy tokens per exact-match item
    "--policies": {"eval", "bench"},  # the policies each sweeps
    "--seed": {"bench"},  # its random prompts and weights (generate, serve: sampling)
}


def flags(parser) -> dict[str, tuple]:
    """{--flag: what a user meets of it: dest, default, type, values, arity, kind}."""
    return {o: (a.dest, a.default, getattr(a.type, "__name__", a.type), tuple(a.choices or ()), a.nargs, a.const,
                type(a).__name__)
            for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


PARSED = {name: flags(cmd.parser()) for name, cmd in COMMANDS.items()}
LIBRARY = {launch.flags.name(f.name): f for c in CONCERNS for f in c.flag_fields()}


def test_a_flag_shared_by_commands_is_the_same_flag_in_each():
    shared = {o for name, fl in PARSED.items() for o in fl if sum(o in other for other in PARSED.values()) > 1}
    assert {"--budget", "--group-size", "--mesh", "--big-little", "--floe-sparsity", "--dtype"} <= shared
    for o in sorted(shared):
        kinds = {name: fl[o] for name, fl in PARSED.items() if o in fl and name not in OWN_MEANING.get(o, ())}
        assert len(set(kinds.values())) <= 1, (o, kinds)


def test_every_command_takes_the_librarys_flag_as_declared():
    for name, fl in PARSED.items():
        for o, (dest, default, *_) in fl.items():
            if o in LIBRARY and name not in OWN_MEANING.get(o, ()):
                assert (dest, default) == (LIBRARY[o].name, LIBRARY[o].default), (name, o)


BAD = [  # a value the library refuses, and its one line
    ("--group-size", "4", "--group-size must be >= 8 (the smallest group every width packs), got 4"),
    ("--rebalance-every", "0", "--rebalance-every must be >= 1, got 0"),
    ("--half-life", "nan", "--half-life must be a number of decode steps > 0, got nan"),
    ("--mesh", "experts=2", "--mesh"),
    ("--little-k", "2", "--little-k applies to --big-little; add --big-little or drop --little-k"),
    ("--budget", "20GX", "expected a size like 20GB"),
    ("--max-new-tokens", "0", "--max-new-tokens must be >= 1, got 0"),
]


@pytest.mark.parametrize("flag, value, needle", BAD, ids=[b[0] for b in BAD])
def test_a_bad_value_of_a_shared_flag_is_the_same_error_line_in_every_command(capsys, flag, value, needle):
    lines = {}
    for name, cmd in COMMANDS.items():
        if flag not in PARSED[name] or name in OWN_MEANING.get(flag, ()):
            continue
        base = {"generate": ["--dry-run"], "serve": ["--dry-run"], "bench": ["--preset", "qwen3-moe-smoke"]}
        assert cmd.main([*base.get(name, []), flag, value]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (name, err)
        lines[name] = err
    assert len(lines) >= 2 and len(set(lines.values())) == 1, lines


def test_engine_options_read_back_what_the_flags_say():
    args = generate.parse_args(["--budget", "30MB", "--policy", "static", "--lo-bits", "3", "--mesh", "expert=2",
                                "--temperature", "0.5", "--big-little", "--little-k", "1", "--no-chat"])
    opts = launch.EngineOptions.from_args(args)
    assert opts.plan.budget_bytes() == 30 * 10**6 and opts.mesh.size() == 2 and opts.prompts.chat is False
    assert dataclasses.replace(opts.policy.dynaexq(), lo_bits=3) == opts.policy.dynaexq()
    assert opts.sampling.params().temperature == 0.5 and opts.big_little.setting(8).little_k == 1


# ----------------------------------------------------------------------------- every script

# Each script (scripts/*.py, the package's commands through theirs) and a value argparse itself
# refuses: not among a flag's choices, or not a number.
ARGPARSE_REFUSALS = {
    "generate": ["--importance", "bogus"],
    "serve": ["--port", "eighty"],
    "eval": ["--residency", "sometimes"],
    "bench": ["--reference", "static4"],
    "lm_eval": ["--no-such-flag"],  # lm-eval's own command line
    "calibrate": ["--up-bits", "5"],
    "aot_report": ["--dtype", "float16"],
    "gpu_check": ["--stages"],  # a flag without its value
    "build_tasks": ["--seed", "x"],
    "train_tiny": ["--steps", "many"],
    "accuracy_sweep": ["--from-bits", "8"],
    "bench_cpu": ["--core", "first"],
    "bench_floe_stream": ["--hidden", "wide"],
    "bench_host": ["--dtype", "float16"],
    "bench_host_memory": ["--gb", "half"],
    "bench_decode_layer": ["--reps", "many"],
    "bench_kernels": ["--bits", "5"],
    "bench_quant": ["--k", "big"],
    "bench_runtime": ["--dtype", "int8"],
    "bench_serve": ["--max-tokens", "lots"],
    "bench_startup": ["--dtype", "float16"],
}


def test_every_script_is_listed():
    from conftest import ROOT

    assert {p.stem for p in (ROOT / "scripts").glob("*.py")} == set(ARGPARSE_REFUSALS)


def run_script(name: str, argv: list[str], monkeypatch) -> int:
    """scripts/NAME.py's main on `argv` (lm_eval's reads sys.argv), its exit status."""
    from conftest import script

    if name in COMMANDS:
        main = COMMANDS[name].main
    elif name == "lm_eval":
        pytest.importorskip("lm_eval", reason="lm-eval is the optional eval extra")
        from dynaexq_jax.cli import lm_eval

        monkeypatch.setattr(sys, "argv", ["lm_eval", *argv])
        main, argv = (lambda _argv: lm_eval.main()), None
    else:
        main = script(name).main
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("name", sorted(ARGPARSE_REFUSALS))
def test_argparse_refusals_are_one_error_line_in_every_script(capsys, monkeypatch, name):
    base = ["--budget", "64MB"] if name == "bench_runtime" else []  # its one required flag
    for argv in (ARGPARSE_REFUSALS[name], ["--no-such-flag"]):
        code = run_script(name, base + argv, monkeypatch)
        err = capsys.readouterr().err
        line = err.splitlines()[-1] if err else ""  # lm-eval logs its own lines before a refusal
        assert code == 2 and line.startswith("error: ") and argv[0] in line and "usage:" not in err, (argv, err)
        assert name == "lm_eval" or err.count("\n") == 1, err


# ----------------------------------------------------------------------------- ranges, before any work


def one_line(capsys, main, argv, needle: str) -> None:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--coordinator", "127.0.0.1:65536", "--mesh", "expert=2"], "port from 1 to 65535"),
    (["--coordinator", "127.0.0.1:0", "--mesh", "expert=2"], "port from 1 to 65535"),
    (["--coordinator", "127.0.0.1", "--mesh", "expert=2"], "expected HOST:PORT"),
    (["--coordinator", ":1234", "--mesh", "expert=2"], "expected HOST:PORT"),
    (["--num-processes", "0"], "--num-processes must be >= 1"),
    (["--num-processes", "2", "--process-id", "2"], "--process-id 2 is not one of"),
    (["--process-id", "-1"], "--process-id must be >= 0"),
    (["--distributed-timeout", "0"], "--distributed-timeout must be >= 1"),
    (["--group-size", "7"], "--group-size must be >= 8"),
    (["--hi-dtype", "int4", "--lo-bits", "4"], "no wider than the int4 fallback"),
    (["--hi-dtype", "int8", "--lo-bits", "8"], "no wider than the int8 fallback"),
    (["--hi-dtype", "int4", "--lo-bits", "mxfp4"], "int4 slots over an mxfp4 fallback would lose precision"),
    (["--floe-sparsity", "0.5"], "--floe-sparsity apply to FloE; pass --policy floe"),
    (["--policy", "static", "--floe-up-bits", "none", "--floe-calibration", "x"],
     "--floe-up-bits, --floe-calibration apply to FloE"),
])
def test_a_flag_out_of_range_is_refused_by_a_dry_run(capsys, argv, needle):
    one_line(capsys, generate.main, ["--dry-run", *argv], needle)


def test_slots_wider_than_their_fallback_and_auto_tiers_pass(capsys):
    for argv in (["--hi-dtype", "int4", "--lo-bits", "3"], ["--hi-dtype", "int8", "--lo-bits", "4"],
                 ["--hi-dtype", "bfloat16", "--lo-bits", "auto"], ["--hi-dtype", "int4", "--lo-bits", "4",
                                                                   "--policy", "static"]):
        assert generate.main(["--dry-run", *argv]) == 0, argv
    capsys.readouterr()


def test_a_group_size_rounds_down_to_the_largest_power_of_two_dividing_the_expert_dims():
    from dynaexq_jax import budget
    from dynaexq_jax.io import preset

    cfg = preset.preset_config("qwen3-moe-smoke")  # hidden 256, experts' intermediate 128
    assert [budget.expert_group_size(cfg, g) for g in (100, 128, 200, 255, 256, 1000, 8)] == [64, 128, 128, 128,
                                                                                              128, 128, 8]
    assert [budget.floe_up_group(cfg, g) for g in (100, 64, 1000)] == [64, 64, 256]


@pytest.mark.parametrize("argv, needle", [
    (["--policies", ","], "--policies ','"),
    (["--policies", "full,fastest"], "fastest is not one"),
    (["--budgets", ","], "--budgets ','"),
    (["--budgets", "none,+200%"], "+P%"),
    (["--tiers", ","], "--tiers ','"),
    (["--lo-bits", ","], "--lo-bits ','"),
    (["--lo-bits", "4,8"], "8 is not one"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--window", "1"], "--window must be >= 2"),
    (["--little-shares", "0,0.5"], "--little-shares applies to --big-little"),
    (["--tiers", "fixed", "--hi-dtype", "int4", "--lo-bits", "4,3"], "no wider than the int4 fallback"),
    (["--policies", "full,static", "--floe-sparsity", "0.5"], "apply to FloE; add floe to --policies"),
])
def test_eval_refuses_an_empty_or_pointless_sweep_before_reading_the_model(capsys, monkeypatch, argv, needle):
    from dynaexq_jax.models import registry

    monkeypatch.setattr(registry, "read_config", lambda *a: pytest.fail("flags are checked first"))
    one_line(capsys, eval_cli.main, argv, needle)


@pytest.mark.parametrize("argv, needle", [
    (["--policies", "dynaexq/int4", "--lo-bits", "4"], "no wider than the int4 fallback"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--routing-skew", "-0.5"], "--routing-skew must be >= 0"),
    (["--batch-sizes", ","], "--batch-sizes ','"),
    (["--batch-sizes", "1,0"], "0 is not one"),
    (["--little-shares", "0.5"], "--little-shares applies to --big-little"),
    (["--mesh", "expert=3", "--policies", "static"], "none of --policies static can run this model"),
    (["--policies", "static,dynaexq", "--floe-up-bits", "none"], "--floe-up-bits apply to FloE"),
])
def test_bench_refuses_a_bad_sweep_before_making_weights(capsys, monkeypatch, argv, needle):
    from dynaexq_jax.io import preset

    monkeypatch.setattr(preset, "random_checkpoint", lambda *a, **k: pytest.fail("no weights before the checks"))
    code = bench.main(["--preset", "qwen3-moe-smoke", *argv])
    last = capsys.readouterr().err.splitlines()[-1]  # a skipped policy says why on a line of its own
    assert code == 2 and last.startswith("error: ") and needle in last, last


def test_an_aot_report_of_an_empty_list_is_an_error(capsys):  # of only refused rows: tests/test_aot.py
    from conftest import script

    one_line(capsys, script("aot_report").main, ["--preset", "qwen3-moe-smoke", "--batch", ","], "--batch ','")
    one_line(capsys, script("aot_report").main, ["--preset", "qwen3-moe-smoke", "--gpu", "h100,a100"],
             "a100 is not one")


@pytest.mark.parametrize("name, argv, needle", [
    ("calibrate", ["--window", "1"], "--window must be >= 2"),
    ("calibrate", ["--group-size", "4"], "--group-size must be >= 8"),
    ("calibrate", ["--sparsity", "1"], "--sparsity 1.0"),
    ("gpu_check", ["--stages", ","], "--stages ','"),
    ("bench_startup", ["--policies", ","], "--policies ','"),
    ("bench_startup", ["--export", "qwen3-moe-smoke:0"], "--export 'qwen3-moe-smoke:0'"),
    ("bench_startup", ["--timeout", "0"], "--timeout must be"),
    ("bench_runtime", ["--budget", "64MB", "--gen-len", "1"], "--gen-len must be >= 2"),
    ("bench_cpu", ["--batch-sizes", "0"], "0 is not one"),
    ("bench_cpu", ["--core", "100000"], "--core must be from 0 to"),
    ("bench_serve", ["--clients", ","], "--clients ','"),
    ("bench_host", ["--repeats", "0"], "--repeats must be >= 1"),
    ("bench_host_memory", ["--gb", "0"], "--gb must be a size in GB > 0"),
    ("bench_host_memory", ["--dir", "/no/such/folder"], "--dir /no/such/folder: no such folder"),
    ("bench_floe_stream", ["--top-k", "64", "--experts", "8"], "--top-k must be at most --experts"),
    ("build_tasks", ["--window", "1"], "--window must be >= 2"),
    ("train_tiny", ["--lr", "0"], "--lr must be a learning rate > 0"),
    ("accuracy_sweep", ["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_a_scripts_flag_out_of_range_is_one_error_line_before_any_work(capsys, name, argv, needle):
    from conftest import script

    one_line(capsys, script(name).main, argv, needle)
