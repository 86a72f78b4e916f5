"""dynaexq-jax: serve Mixture-of-Experts models on memory-limited GPUs with JAX.

Every expert stays on the device in a low-bit fallback; the hottest experts, estimated online
from router traces, also hold a high-precision slot, swapped asynchronously between decode
steps under a hard device-memory budget.

    import dynaexq_jax as dx
    ckpt = dx.load("checkpoints/tiny-qwen3-moe", jnp.float32)      # weights, config, tokenizer
    eng, plan = dx.build_engine(ckpt, "dynaexq", budget=dx.parse_size("20GB"), batch=1,
                                longest_prompt=128, max_new_tokens=256)
    ids = ckpt.tokenizer.encode("def f(x):").ids
    gen = eng.generate([ids], 32, dx.SamplingParams())             # .tokens, .stats, .expert_counts
    logps, routing = eng.score([ids])                              # log p(token | prefix), routing stats
    print(plan.table())                                            # where every device byte goes

From research code: `dx.Decoder(cfg, dtype)` is the model as a pure function of explicit
pytrees, `(params, experts, cache, tokens, positions, valid) -> (logits, cache, routing)`;
`eng.params` and `eng.policy.experts` (an `ExpertState`) are the arrays a step takes, so the
model can be called inside one's own `jax.jit` with any expert state (a promotion is a new
value, never a retrace). Policies: `dx.POLICIES`; options: `dx.DynaExqOptions`.
"""

from dynaexq_jax.budget import MemoryPlan, parse_size
from dynaexq_jax.errors import UserError
from dynaexq_jax.experts.expert_state import ExpertState, ExpertTier
from dynaexq_jax.io.loader import Checkpoint, load
from dynaexq_jax.models.config import ModelConfig
from dynaexq_jax.models.decoder import Decoder, KVCache
from dynaexq_jax.policies import POLICIES
from dynaexq_jax.policies.dynaexq import DynaExqOptions
from dynaexq_jax.runtime.build import build_engine, plan_for
from dynaexq_jax.runtime.engine import Engine, Generation
from dynaexq_jax.runtime.sampling import SamplingParams

__all__ = [
    "POLICIES",
    "Checkpoint",
    "Decoder",
    "DynaExqOptions",
    "Engine",
    "ExpertState",
    "ExpertTier",
    "Generation",
    "KVCache",
    "MemoryPlan",
    "ModelConfig",
    "SamplingParams",
    "UserError",
    "build_engine",
    "load",
    "parse_size",
    "plan_for",
]
