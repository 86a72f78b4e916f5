"""The commands' flags: a flag that several commands take is one flag, declared once in
`dynaexq_jax.launch.options`, with the same name, default, values and error in each."""

from __future__ import annotations

import dataclasses

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
