"""The way from options to a running engine, as the commands take it and as a library.

    from dynaexq_jax import launch

    opts = launch.EngineOptions(model=launch.ModelOptions("checkpoints/tiny-qwen3-moe", dtype="float32"),
                                plan=launch.PlanOptions(budget="30MB"))
    opts.check()                                      # every flag's check, and those between them
    path, cfg, tok = launch.read_model(opts.model)    # config.json and the tokenizer, no weights
    ids = [tok.encode("def fibonacci(n):").ids]
    shape = launch.plan_shape(opts, cfg, [len(i) for i in ids])
    plan, text = launch.memory_plan(opts, cfg, shape, opts.plan.budget_bytes())   # from the config alone
    eng, plan, ckpt, load_s = launch.load_engine(opts, opts.plan.budget_bytes(), cfg, shape)
    gen = eng.generate(ids, opts.sampling.max_new_tokens, opts.sampling.params())

`options` holds one dataclass per concern (model, memory plan, residency policy, sampling,
mesh, big-little, prompts, output), each flag's name, default, help and check declared once on
its field (`flags`); `plan` sizes a run and makes its memory plan and the plan's text;
`engine` reads the model and builds the engine (`io.loader.load`, then
`runtime.build.build_engine`, the public API's own path); `prompts` turns text into token ids;
`report` holds a run's stats and the lines the commands print about them. The commands in
`dynaexq_jax.cli` add these groups to their parsers and keep only their own flags and job.
"""

from dynaexq_jax.launch.engine import Loaded, check_hotness, check_vocab, load_engine, read_model
from dynaexq_jax.launch.flags import FlagError, Options, flag
from dynaexq_jax.launch.options import (
    BigLittleOptions,
    BigLittleSweep,
    EngineOptions,
    MeshOptions,
    ModelOptions,
    OutputOptions,
    PlanOptions,
    PolicyOptions,
    PromptOptions,
    SamplingOptions,
    add_engine_flags,
)
from dynaexq_jax.launch.plan import index_check, memory_plan, plan_shape
from dynaexq_jax.launch.prompts import Conversation, Prompter
from dynaexq_jax.launch.report import run_stats, runtime_info, summary_line

__all__ = [
    "BigLittleOptions",
    "BigLittleSweep",
    "Conversation",
    "EngineOptions",
    "FlagError",
    "Loaded",
    "MeshOptions",
    "ModelOptions",
    "Options",
    "OutputOptions",
    "PlanOptions",
    "PolicyOptions",
    "PromptOptions",
    "Prompter",
    "SamplingOptions",
    "add_engine_flags",
    "check_hotness",
    "check_vocab",
    "flag",
    "index_check",
    "load_engine",
    "memory_plan",
    "plan_shape",
    "read_model",
    "run_stats",
    "runtime_info",
    "summary_line",
]
