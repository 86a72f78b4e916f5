"""dynaexq-jax: serve Qwen3-MoE models on one memory-limited GPU.

Every expert stays on the device in a low-bit fallback; the hottest experts, estimated online
from router traces, also hold a high-precision slot, swapped asynchronously between decode
steps under a hard device-memory budget.

Public API:

    ckpt = dynaexq_jax.load("checkpoints/tiny-qwen3-moe", dtype=jnp.float32)
    eng = dynaexq_jax.Engine(ckpt)                      # every expert at full precision
    eng.logits([[1, 2, 3]])                             # -> [np.ndarray [3, vocab]]
    eng.generate([[1, 2, 3]], max_new_tokens=16, sampling=dynaexq_jax.SamplingParams())

    ckpt = dynaexq_jax.load(path, experts_on_device=False)
    eng, plan = dynaexq_jax.build_engine(ckpt, "dynaexq", budget=parse_size("20GB"), batch=1,
                                         longest_prompt=128, max_new_tokens=256)

Kernels and quantization: `dynaexq_jax.experts.quant.quantize / dequantize`,
`dynaexq_jax.experts.matmul.grouped_matmul`, `pallas_kernels.grouped_dequant_matmul`.
"""

from dynaexq_jax.budget import parse_size, plan_memory
from dynaexq_jax.models.config import Qwen3MoeConfig
from dynaexq_jax.runtime.engine import Engine, Generation
from dynaexq_jax.errors import UserError
from dynaexq_jax.io.loader import Checkpoint, load
from dynaexq_jax.policies import DynaExqOptions, build_engine
from dynaexq_jax.runtime.sampling import SamplingParams

__all__ = [
    "Checkpoint",
    "DynaExqOptions",
    "Engine",
    "Generation",
    "Qwen3MoeConfig",
    "SamplingParams",
    "UserError",
    "build_engine",
    "load",
    "parse_size",
    "plan_memory",
]
