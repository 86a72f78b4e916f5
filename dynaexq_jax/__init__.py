"""dynaexq-jax: serve Mixture-of-Experts models on memory-limited GPUs with JAX.

Every expert stays on the device in a low-bit fallback; the hottest experts, estimated online
from router traces, also hold a high-precision slot, swapped asynchronously between decode
steps under a hard device-memory budget.

The surface for research code (README, "Python API", runs this as a test):

    import jax, jax.numpy as jnp
    import dynaexq_jax as dx

    ckpt = dx.load("checkpoints/tiny-qwen3-moe", jnp.float32)     # config, weights, experts, tokenizer
    eng, plan = dx.build_engine(ckpt, "dynaexq", budget=dx.parse_size("30MB"), batch=1,
                                longest_prompt=32, max_new_tokens=16)
    ids = ckpt.tokenizer.encode("def fibonacci(n):").ids
    gen = eng.generate([ids], 16)                     # greedy; dx.SamplingParams(...) samples
    logps, routing = eng.score([ids])                 # log p(token | prefix); routing statistics

- load with a policy and a budget: `load`, then `build_engine(ckpt, policy, budget=...)` with a
  policy from `POLICIES` (options: `DynaExqOptions`); `plan_for` is the same memory plan from
  the config alone; `plan.table()` shows where every device byte goes.
- the command line's path, as a library: `launch` (`dynaexq_jax.launch`). Its options
  dataclasses (`launch.EngineOptions` of `ModelOptions`, `PlanOptions`, `PolicyOptions`,
  `SamplingOptions`, `MeshOptions`, ...) hold what the flags hold, with the flags' checks
  (`check()`); `launch.memory_plan` is `plan_for` for them plus the plan's text (--dry-run);
  `launch.read_model` gives the config and tokenizer; `launch.load_engine` is `load`, the auto
  tiers, the mesh placement and `build_engine`, as scripts/generate.py and scripts/serve.py run
  them (README, "Python API", has the example).
- FloE: `build_engine(ckpt, "floe", ..., floe=FloeOptions(sparsity=0.9))` (int2 HQQ up
  projections resident, active gate/down channels streamed; thresholds from
  scripts/calibrate.py, saved beside the expert cache).
- generate and score: `Engine.generate` -> `Generation(tokens, stats, expert_counts)`;
  `Engine.score` -> per-sequence log-probabilities and `RoutingStats`; `Engine.logits`.
- stats: `Generation.stats` (throughput, compile_s, hi_hit_rate, the policy's counters) and
  `engine.policy.stats()` (promotions, demotions, h2d_bytes, fill_s, convert_s, ...).
- inside one's own `jax.jit`: `engine.steps` (`Steps`) holds the engine's prefill, decode,
  score and logits steps as pure functions of explicit pytrees; `engine.params` and
  `engine.policy.experts` (an `ExpertState` pytree) are what they take, with a
  `KVCache.empty(...)` and inputs from `left_pad`. A promotion is a new `ExpertState` value
  of the same shapes, never a retrace. `Decoder(cfg, dtype)` is the bare model. On a CPU, pass
  `compiler_options()` to `.lower(...).compile(...)` as the engine does (it keeps XLA from
  holding a float32 copy of every expert).
- several devices: `build_engine(..., mesh=runtime.mesh.expert_mesh(N))` spreads each layer's
  experts over N devices (expert parallel; `budget` and the plan are then per device;
  `placement=runtime.mesh.Placement.balanced(profile, N)` balances a hotness profile's load).
- serve: `dynaexq_jax.runtime.scheduler.Scheduler` batches requests continuously over an
  engine built with `dynaexq_jax.serve.engine_shape(...)`; `dynaexq_jax.serve.serve(engine, ...)`
  is the OpenAI-compatible server over it (the `serve` extra; scripts/serve.py).
- `enable_compile_cache()`: JAX's persistent compilation cache for this process, as the
  scripts turn it on (`~/.cache/dynaexq/jax`; `DYNAEXQ_COMPILE_CACHE=0` turns it off).
"""

from dynaexq_jax import launch
from dynaexq_jax.budget import MemoryPlan, parse_size
from dynaexq_jax.errors import UserError
from dynaexq_jax.experts.expert_state import ExpertState, ExpertTier
from dynaexq_jax.io.loader import Checkpoint, load
from dynaexq_jax.models.config import ModelConfig
from dynaexq_jax.models.decoder import Decoder, KVCache
from dynaexq_jax.policies import POLICIES
from dynaexq_jax.policies.dynaexq import DynaExqOptions
from dynaexq_jax.policies.floe import FloeOptions
from dynaexq_jax.runtime.build import build_engine, plan_for
from dynaexq_jax.runtime.compile_cache import enable as enable_compile_cache
from dynaexq_jax.runtime.engine import Engine, Generation, RoutingStats, Steps, compiler_options, left_pad
from dynaexq_jax.runtime.sampling import SamplingParams

__all__ = [
    "POLICIES",
    "Checkpoint",
    "Decoder",
    "DynaExqOptions",
    "Engine",
    "ExpertState",
    "ExpertTier",
    "FloeOptions",
    "Generation",
    "KVCache",
    "MemoryPlan",
    "ModelConfig",
    "RoutingStats",
    "SamplingParams",
    "Steps",
    "UserError",
    "build_engine",
    "compiler_options",
    "enable_compile_cache",
    "launch",
    "left_pad",
    "load",
    "parse_size",
    "plan_for",
]
