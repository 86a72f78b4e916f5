"""Memory budgets: parsing and printing sizes, and the plan of every device byte.

Sizes are written the way Hugging Face accelerate's `convert_file_size_to_int` reads them
(`max_memory={"cuda:0": "20GB"}`), so a budget string means the same here as there:
GB/MB/KB are powers of 1000, GiB/MiB/KiB powers of 1024, decimals allowed, units
case-insensitive. Two deliberate differences, both to keep a hard budget from being misread:

- accelerate reads a decimal unit whose final letter is a lowercase "b" ("20gb", "20Gb") as
  bits, i.e. an eighth of the bytes. Most people typing "20gb" mean bytes, and either silent
  reading is wrong for someone, so such strings are rejected with the spelling to use
  ("20GB", or "20gB"). Binary units carry no such rule there and are accepted in any case.
- Only plain decimal numbers are accepted ("1e3GB", "inf", "nan" are refused), and plain
  whole bytes ("123456") are accepted, which accelerate only takes as an int.

Fractional results are rounded down to whole bytes, as accelerate does.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from fractions import Fraction

from dynaexq_jax.errors import UserError


class BudgetError(UserError):
    """A memory budget that cannot be parsed or cannot be met."""


_UNITS = {
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# Surrounding whitespace is ignored (values read from files); only spaces may separate number and unit.
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+) *([kmgt]i?b)?\s*", re.IGNORECASE)
_EXAMPLE = "expected a size like 20GB, 20GiB, 5.5GB, 512MiB or plain bytes"


def _bad(text, why: str) -> BudgetError:
    # repr() keeps the message on one line whatever the input holds.
    return BudgetError(f"bad memory size {text!r} ({why}); {_EXAMPLE}")


def parse_size(text: str | int) -> int:
    """Bytes in a size such as "20GB", "20 GiB", "5.5GB", "512MiB", "123456", or a positive int."""
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        if text <= 0:
            raise _bad(text, "must be positive")
        return int(text)
    if not isinstance(text, str):
        raise _bad(text, f"not a string or int but {type(text).__name__}")
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise _bad(text, "not a number followed by an optional unit")
    number, unit = m.groups()
    if unit is None:
        if "." in number:
            raise _bad(text, "plain bytes must be a whole number")
        nbytes = int(number)
    else:
        if unit[-1] == "b" and "i" not in unit.lower():
            raise _bad(text, f"a lowercase 'b' means bits to accelerate; write {unit[:-1].upper()}B for bytes")
        nbytes = int(Fraction(number) * _UNITS[unit.lower()])  # exact, then floor
    if nbytes <= 0:
        raise _bad(text, "must be at least one byte")
    return nbytes


def format_size(nbytes: float) -> str:
    """Human-readable size in powers of 1000, e.g. "19.87 GB", the units `parse_size` reads back."""
    sign = "-" if nbytes < 0 else ""
    value = abs(nbytes)
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if value >= scale:
            return f"{sign}{value / scale:.2f} {unit}"
    return f"{sign}{value:.0f} B"


# ----------------------------------------------------------------------------- memory plan

_BF16 = 2


MXFP4 = "mxfp4"  # the fallback format beside the integer widths (`quant.Mxfp4Tensor`)
FLOE_UP_GROUP = 64  # FloE's HQQ groups along the up projection's K (hidden_size)


def format_name(bits: int | str) -> str:
    """A fallback format as messages name it: "int4", "mxfp4"."""
    return MXFP4 if bits == MXFP4 else f"int{bits}"


def quantized_nbytes(shape: tuple[int, ...], bits: int | str, group_size: int) -> int:
    """Exact bytes of `quant.quantize(w[shape], bits, group_size)`: packed codes + bf16
    scales and zeros (layout in `quant`; a test pins this against `QuantizedTensor.nbytes`).
    bits MXFP4: `quant.Mxfp4Tensor`'s half a byte per value + one scale byte per 32 values
    (4.25 bits a value, whatever `group_size`)."""
    *lead, k, n = shape
    experts = math.prod(lead)
    if bits == MXFP4:
        return experts * (k // 2 * n + k // 32 * n)
    return experts * (k * bits // 8 * n + 2 * (k // group_size) * n * _BF16)


def power_of_two_at_most(n: int) -> int:
    """The largest power of two <= n (n >= 1)."""
    return 1 << (int(n).bit_length() - 1)


def expert_group_size(cfg, requested: int = 128) -> int:
    """The largest power-of-two group size <= `requested` dividing both expert input dims."""
    g = power_of_two_at_most(requested)
    while g > 8 and (cfg.hidden_size % g or cfg.moe_intermediate_size % g):
        g //= 2
    if cfg.hidden_size % g or cfg.moe_intermediate_size % g:
        raise BudgetError(
            f"no quantization group size divides hidden_size={cfg.hidden_size} and "
            f"moe_intermediate_size={cfg.moe_intermediate_size}; pass a --group-size that does"
        )
    return g


def expert_bias_count(cfg) -> int:
    """Parameters of the experts' biases (gpt-oss): gate_up [2I] and down [H] per expert."""
    if not cfg.expert_bias:
        return 0
    return len(cfg.moe_layers) * cfg.num_experts * (2 * cfg.moe_intermediate_size + cfg.hidden_size)


def float32_count(cfg) -> int:
    """Parameters kept in float32 whatever the compute dtype: sigmoid routers and their
    score-correction biases (`layers.router_logits`)."""
    if cfg.router != "sigmoid_topk":
        return 0
    return len(cfg.moe_layers) * cfg.num_experts * (cfg.hidden_size + 1)


def non_expert_count(cfg) -> int:
    """Embeddings, attention (biases and sinks included), norms, routers, dense MLPs, shared
    experts and the LM head: every tensor the family adapter's tables name outside the routed
    experts, which are exactly the decoder's params; plus the experts' biases."""
    from dynaexq_jax.models import registry

    fam = registry.adapter(cfg)
    total = sum(math.prod(t.shape) for t in fam.top_tensors(cfg))
    for i in range(cfg.num_layers):
        total += sum(math.prod(t.shape) for t in fam.layer_tensors(cfg, i))
    return total + expert_bias_count(cfg)


def non_expert_nbytes(cfg, itemsize: int) -> int:
    """Bytes of `non_expert_count`'s parameters on the device: the compute dtype's `itemsize`
    each (the experts' biases too: they stay resident at it whatever tier serves their
    expert), float32 for `float32_count` of them."""
    return non_expert_count(cfg) * itemsize + float32_count(cfg) * max(4 - itemsize, 0)


def expert_shapes(cfg) -> tuple[tuple[int, int], tuple[int, int]]:
    """[K, N] of one expert's gate_up and down matrices."""
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    return (H, 2 * I), (I, H)


# High-precision slot formats stored group-wise quantized (`quant.QuantizedTensor`), by their bit
# width; any other hi_dtype is the checkpoint's compute dtype. int4 over int2 fallbacks is DynaExq's
# Qwen3-Next-80B setting.
HI_BITS = {"int8": 8, "int4": 4}


def slot_nbytes(cfg, hi_dtype: str, group_size: int, itemsize: int = _BF16) -> int:
    """Device bytes of one high-precision slot (one expert's gate_up and down); a slot not
    in `HI_BITS` holds the checkpoint's compute dtype (`itemsize` bytes)."""
    gu, dn = expert_shapes(cfg)
    if hi_dtype in HI_BITS:
        return quantized_nbytes(gu, HI_BITS[hi_dtype], group_size) + quantized_nbytes(dn, HI_BITS[hi_dtype], group_size)
    return (math.prod(gu) + math.prod(dn)) * itemsize


def kv_cache_nbytes(cfg, batch: int, context: int, itemsize: int) -> int:
    """K and V of the softmax-attention layers, and the linear-attention layers' constant-size
    states (conv inputs and float32 delta-rule state per sequence, `models.deltanet`)."""
    # Latent attention caches kv_lora_rank + qk_rope_head_dim values per token (`models.mla`).
    per_token = cfg.kv_lora_rank + cfg.head_dim if cfg.mla else 2 * cfg.num_kv_heads * cfg.head_dim
    per_layer = batch * context * per_token * itemsize
    linear = 0
    if cfg.linear_layers:
        from dynaexq_jax.models import deltanet

        linear = deltanet.state_nbytes(cfg, batch, {1: "int8", 2: "bfloat16", 4: "float32"}[itemsize])
    return len(cfg.full_layers) * per_layer + linear + batch * context  # + the validity mask


def workspace_nbytes(cfg, batch: int, prompt: int, context: int, itemsize: int) -> int:
    """Upper estimate of the transient buffers of the largest step (prefill of `prompt`).

    Attention scores of one layer, the residual stream and norms, the MoE block's routed pairs
    (gathered rows, gate_up, activation, down), the last position's logits, one expert
    materialised in float32 (the CPU path dequantizes one expert at a time; the GPU kernels
    dequantize in registers), a dense MLP's (shared expert's) activations, and twice one
    layer's attention, router and dense-MLP weights (a prefill's XLA matmuls read their layer
    through a copy of its slice of the stacked weights; decode's kernels read the stack in
    place). Expert weights never get a transient copy.

    The engine checks it against XLA's own figure for the compiled steps
    (`memory_analysis().temp_size_in_bytes`) and reports both.
    """
    H, I, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.experts_per_token
    tokens = batch * prompt
    pairs = tokens * k
    scores = batch * cfg.num_heads * prompt * context * 4  # f32 attention scores, one layer
    hidden = 6 * tokens * H * 4  # residual stream, norms, attention in/out
    moe = pairs * (H * itemsize + 2 * I * 4 + I * 4 + H * 4 + 16)  # gathered x, gate_up, act, down, sort keys
    logits = batch * cfg.vocab_size * 4 * 2
    one_expert = 2 * 3 * H * I * 4
    D = cfg.head_dim
    # A layer's dense MLP: the shared expert of a MoE layer, or a dense layer's MLP (its
    # intermediate activations in float32, its weights sliced like attention's).
    dense = max(cfg.shared_expert_size if cfg.moe_layers else 0,
                cfg.intermediate_size if len(cfg.moe_layers) < cfg.num_layers else 0)
    q_heads = 3 if cfg.attn_output_gate else 2  # q and o (and the output gate)
    attention_weights = H * D * (q_heads * cfg.num_heads + 2 * cfg.num_kv_heads)
    if cfg.mla:  # its projections; a fresh prefill's keys and values expanded per head, in float32
        NH, C, DN, DV = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
        q_in = cfg.q_lora_rank or H
        attention_weights = (H * cfg.q_lora_rank + q_in * NH * (DN + D) + H * (C + D) + C * NH * (DN + DV)
                             + NH * DV * H)
        hidden += 3 * tokens * NH * (DN + D + DV) * 4
    linear = 0
    if cfg.linear_layers:
        # A gated DeltaNet layer's prefill: per value head and token, its rows of the chunk's
        # decay, correction, system and attention matrices, q/k/v/z and the solves in float32;
        # the convolution's inputs and outputs.
        NK, NV = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        DK, DV = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        chunk, conv = min(64, prompt), 2 * NK * DK + NV * DV
        linear = tokens * (NV * (4 * chunk + 6 * DK + 4 * DV) + 3 * conv) * 4
        attention_weights = max(attention_weights, H * (2 * NK * DK + 2 * NV * DV + 2 * NV) + NV * DV * H)
    layer_weights = (attention_weights + cfg.num_experts * H + 3 * H * dense) * itemsize
    mlp = 3 * tokens * dense * 4
    return (3 * (scores + hidden + moe + mlp + logits + linear)) // 2 + one_expert + 2 * layer_weights + 16 * 2**20


STAGING_EXPERTS = 2  # promotions in flight at once (`experts.swap.Swapper`'s copies on the device)


def staging_nbytes(slot_bytes: int) -> int:
    """Device bytes of the promotions in flight: each expert's copy and, while it lands, its slot's
    layout made from it (a checkpoint's [out, in] tensors transposed on the device)."""
    return 2 * STAGING_EXPERTS * slot_bytes


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Where every device byte of a run goes. `slots` is what the budget leaves for slots."""

    budget: int | None
    weights: int  # non-expert parameters
    fallback: int  # every expert at lo_bits
    kv_cache: int
    workspace: int  # transient buffers of the largest step, slots aside
    slot_bytes: int  # one high-precision slot
    slots: int
    num_experts_total: int  # experts over all MoE layers
    moe_layers: int
    lo_bits: int | str | None = None  # bit width of the fallback experts, or MXFP4; None: no fallback
    mid_bits: int | None = None  # a wider fallback width for `mid_experts` of them (stored only at it)
    mid_experts: int = 0
    fallback_label: str = "fallback experts"  # what `fallback` holds (floe: the up projections)
    promotes: bool = False  # slots filled by promotions (dynaexq): their copies in flight are planned (`staging`)
    # Host memory, outside the budget (`with_host`): what the run reads through file mappings
    # (page cache the kernel may evict and read again), what it holds in process memory for its
    # whole life, and the most it holds for a while at start (one layer of experts converting).
    host_mapped: int = 0
    host_mapped_from: str = ""
    host_held: int = 0
    host_transient: int = 0

    @property
    def slots_total_bytes(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def staging(self) -> int:
        """Device bytes of the promotions' copies on their way into the slots (`staging_nbytes`),
        where a promoting plan has slots."""
        return self._staging(self.slots)

    def _staging(self, slots: int) -> int:
        return staging_nbytes(self.slot_bytes) if self.promotes and slots else 0

    @property
    def total(self) -> int:
        return self.weights + self.fallback + self.kv_cache + self.workspace + self.staging + self.slots_total_bytes

    @property
    def unallocated(self) -> int | None:
        """Device bytes of the plan still free while the experts are converted (the slots, KV
        cache and workspace come after): the room a conversion call may use. None: no budget."""
        return None if self.budget is None else self.kv_cache + self.workspace + self.staging + self.slots_total_bytes

    @property
    def minimum(self) -> int:
        """The smallest budget that holds everything but the slots."""
        return self.weights + self.fallback + self.kv_cache + self.workspace

    def budget_for(self, slots: int) -> int:
        """The smallest budget that holds `slots` slots: this plan at that count."""
        return self.minimum + self._staging(slots) + slots * self.slot_bytes

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(slots_total_bytes=self.slots_total_bytes, staging=self.staging, total=self.total, minimum=self.minimum)
        return d

    def table(self) -> str:
        mid = f" ({self.mid_experts} at int{self.mid_bits})" if self.mid_experts else ""
        rows = [
            ("non-expert weights", self.weights),
            (f"{self.fallback_label}{mid}", self.fallback),
            (f"high-precision slots ({self.slots} x {format_size(self.slot_bytes)})", self.slots_total_bytes),
            *([(f"promotion staging ({STAGING_EXPERTS} experts in flight)", self.staging)] if self.staging else []),
            ("KV cache", self.kv_cache),
            ("workspace margin", self.workspace),
            ("total", self.total),
        ]
        if self.budget is not None:
            rows.append(("budget", self.budget))
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {format_size(n):>11}" for name, n in rows]
        per_layer = self.slots / max(self.moe_layers, 1)
        lines.append(
            f"{self.slots} of {self.num_experts_total} experts can hold a slot "
            f"({per_layer:.1f} per MoE layer on average)"
        )
        mapped = (f"{format_size(self.host_mapped)} mapped from {self.host_mapped_from} (page cache, read as "
                  f"used), " if self.host_mapped else "")
        start = (f", {format_size(self.host_transient)} more at start (one layer of experts converting)"
                 if self.host_transient else "")
        lines.append(f"host memory, outside the budget: {mapped}{format_size(self.host_held)} held{start}")
        return "\n".join(lines)


def plan_memory(
    cfg,
    *,
    budget: int | None,
    batch: int,
    prompt: int,
    context: int,
    dtype_itemsize: int,
    lo_bits: int,
    hi_dtype: str,
    group_size: int,
    max_slots: int | None = None,
    mid_bits: int | None = None,
    mid_experts: int = 0,
    promotes: bool = False,
) -> MemoryPlan:
    """Split `budget` into weights, fallback, KV cache, workspace and as many slots as fit
    (at most `max_slots`). `mid_experts` of the fallbacks are stored at `mid_bits` instead of
    `lo_bits` (and only there), so each costs the difference. `promotes`: the slots are filled
    by promotions (dynaexq), so a plan with slots also holds their copies in flight (`staging`).

    No budget means room for every expert's slot. A budget below the minimum is a one-line
    BudgetError that states the minimum for this model, batch and context.
    """
    gu, dn = expert_shapes(cfg)
    n_moe = len(cfg.moe_layers)
    E = cfg.num_experts
    per_layer = quantized_nbytes((E,) + gu, lo_bits, group_size) + quantized_nbytes((E,) + dn, lo_bits, group_size)
    mid_extra = 0
    if mid_experts:
        if mid_bits is None or mid_bits <= lo_bits or not 0 < mid_experts <= n_moe * E:
            raise ValueError(f"mid tier int{mid_bits} x {mid_experts} does not fit over int{lo_bits} x {n_moe * E}")
        one = lambda bits: quantized_nbytes(gu, bits, group_size) + quantized_nbytes(dn, bits, group_size)
        mid_extra = mid_experts * (one(mid_bits) - one(lo_bits))
    parts = dict(
        weights=non_expert_nbytes(cfg, dtype_itemsize),
        fallback=n_moe * per_layer + mid_extra,
        kv_cache=kv_cache_nbytes(cfg, batch, context, dtype_itemsize),
        workspace=workspace_nbytes(cfg, batch, prompt, context, dtype_itemsize),
    )
    slot = slot_nbytes(cfg, hi_dtype, group_size, dtype_itemsize)
    minimum = sum(parts.values())
    staging = staging_nbytes(slot) if promotes else 0
    if budget is None:
        slots = n_moe * E
    elif budget < minimum:
        raise BudgetError(
            f"budget {format_size(budget)} cannot hold the {format_name(lo_bits)} fallback experts "
            f"({format_size(parts['fallback'])}), weights and KV cache for batch {batch} x context {context}: the "
            f"minimum is {format_size(minimum)} ({minimum} bytes)"
        )
    else:
        slots = min(max(budget - minimum - staging, 0) // slot, n_moe * E)
    if max_slots is not None:
        slots = min(slots, max_slots)
    return MemoryPlan(
        budget=budget, slot_bytes=slot, slots=int(slots), num_experts_total=n_moe * E, moe_layers=n_moe,
        lo_bits=lo_bits, mid_bits=mid_bits if mid_experts else None, mid_experts=mid_experts,
        promotes=promotes, **parts
    )


def parameter_count(cfg) -> int:
    """Parameters of the checkpoint as config.json describes it (for checking an index's size)."""
    gu, dn = expert_shapes(cfg)
    return non_expert_count(cfg) + len(cfg.moe_layers) * cfg.num_experts * (math.prod(gu) + math.prod(dn))


def with_host(plan: MemoryPlan, cfg, policy: str, hi_dtype: str, dtype_itemsize: int) -> MemoryPlan:
    """`plan` with the host memory `policy` takes: a bank of high-precision copies (dynaexq's
    slots, offload's experts) mapped from the checkpoint's files or, for int8/int4 slots, from
    the converted-expert cache (held in process memory where the cache is off); FloE's gate and
    down projections held; and one layer of experts at the checkpoint's dtype while converting."""
    gu, dn = expert_shapes(cfg)
    dense = plan.num_experts_total * (math.prod(gu) + math.prod(dn)) * dtype_itemsize
    layer = dense // max(plan.moe_layers, 1)
    mapped, source, held = 0, "", 0
    if policy in ("offload", "prefetch") or (policy == "dynaexq" and plan.slots and hi_dtype not in HI_BITS):
        mapped, source = dense, "the checkpoint's files"
    elif policy == "dynaexq" and plan.slots:
        mapped, source = plan.num_experts_total * plan.slot_bytes, "the converted-expert cache"
    elif policy == "floe":  # gate and down of every expert, gathered from on the host
        held = plan.num_experts_total * 2 * cfg.hidden_size * cfg.moe_intermediate_size * dtype_itemsize
    transient = 0 if policy in ("offload", "prefetch") else layer
    return dataclasses.replace(plan, host_mapped=mapped, host_mapped_from=source, host_held=held,
                               host_transient=transient)


def _device_plan(
    cfg,
    policy: str,
    *,
    budget: int | None,
    batch: int,
    prompt: int,
    context: int,
    dtype_itemsize: int,
    lo_bits: int,
    hi_dtype: str,
    group_size: int,
    max_slots: int | None = None,
    mid_bits: int | None = None,
    mid_experts: int = 0,
    floe_up_bits: int | None = 2,
    floe_group: int = FLOE_UP_GROUP,
) -> MemoryPlan:
    """`policy_plan` without the host memory."""

    def plan(bits, b):
        return plan_memory(
            cfg, budget=b, batch=batch, prompt=prompt, context=context, dtype_itemsize=dtype_itemsize,
            lo_bits=bits, hi_dtype=hi_dtype, group_size=group_size,
        )

    if policy == "full":
        hi = slot_nbytes(cfg, "bfloat16", group_size, dtype_itemsize)
        full = dataclasses.replace(plan(lo_bits, None), fallback=0, slot_bytes=hi, budget=budget, lo_bits=None)
        if budget is not None and full.total > budget:
            raise BudgetError(
                f"policy 'full' needs {format_size(full.total)} for every expert at high precision, "
                f"over the budget of {format_size(budget)}; use --policy dynaexq or a larger --budget"
            )
        return full
    if policy == "static":
        bits = lo_bits
        if budget is not None and lo_bits != MXFP4:  # MXFP4 was asked for: it fits, or the plan says why not
            fits = [b for b in (8, 4, 3, 2) if plan(b, None).minimum <= budget]
            bits = fits[0] if fits else 2
        return dataclasses.replace(plan(bits, budget), slots=0)
    if policy in ("offload", "prefetch"):
        k = cfg.experts_per_token
        slot = slot_nbytes(cfg, "bfloat16", group_size, dtype_itemsize)
        staging = min(batch * k, cfg.num_experts)
        base = plan(lo_bits, None)
        p = dataclasses.replace(
            base, budget=budget, fallback=0, slot_bytes=slot, workspace=base.workspace + staging * slot, lo_bits=None
        )
        slots = p.num_experts_total
        if budget is not None:
            need = p.minimum + k * slot
            if budget < need:
                raise BudgetError(
                    f"budget {format_size(budget)} cannot hold the weights, KV cache, workspace and {k} expert "
                    f"slots that policy {policy!r} needs: the minimum is {format_size(need)} ({need} bytes)"
                )
            slots = min((budget - p.minimum) // slot, p.num_experts_total)
        return dataclasses.replace(p, slots=int(slots))
    if policy == "floe":
        return floe_plan(cfg, budget=budget, batch=batch, prompt=prompt, context=context, dtype_itemsize=dtype_itemsize,
                         up_bits=floe_up_bits, group_size=floe_group)
    return plan_memory(cfg, budget=budget, batch=batch, prompt=prompt, context=context, dtype_itemsize=dtype_itemsize,
                       lo_bits=lo_bits, hi_dtype=hi_dtype, group_size=group_size, max_slots=max_slots,
                       mid_bits=mid_bits, mid_experts=mid_experts, promotes=True)



def policy_plan(cfg, policy: str, *, hi_dtype: str, dtype_itemsize: int, **kw) -> MemoryPlan:
    """The plan `runtime.build.build_engine` makes for `policy`, from the config alone, so that a
    dry run (and a run, before it loads any weight) can show it and refuse a budget early.
    Keywords: `budget`, `batch`, `prompt`, `context`, `lo_bits`, `group_size`, and optionally
    `max_slots`, `mid_bits`, `mid_experts`, `floe_up_bits`, `floe_group`.

    dynaexq: fallbacks (`mid_experts` of them at `mid_bits`) + slots (at most `max_slots`);
    full: every expert at high precision, no fallback; static: the widest bit width whose
    fallback fits, no slots; offload / prefetch: no fallback, slots
    in the checkpoint's dtype, and staging room in the workspace for one layer's copies in
    flight (a token's experts must fit at once); floe: `floe_plan` (up projections at
    `floe_up_bits` in groups of `floe_group`). With the host memory each takes (`with_host`).
    """
    plan = _device_plan(cfg, policy, hi_dtype=hi_dtype, dtype_itemsize=dtype_itemsize, **kw)
    return with_host(plan, cfg, policy, hi_dtype, dtype_itemsize)


def floe_up_group(cfg, requested: int = FLOE_UP_GROUP) -> int:
    """The largest power of two <= `requested` dividing hidden_size (the up projection's K)."""
    g = power_of_two_at_most(requested)
    while g > 8 and cfg.hidden_size % g:
        g //= 2
    if cfg.hidden_size % g:
        raise BudgetError(f"no group size divides hidden_size={cfg.hidden_size} for FloE's up projection; "
                          f"use --floe-up-bits none")
    return g


def floe_up_nbytes(cfg, up_bits: int | None, group_size: int, itemsize: int) -> int:
    """Device bytes of one MoE layer's up projections [E, H, I] (None: at `itemsize`)."""
    shape = (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    if up_bits is None:
        return math.prod(shape) * itemsize
    return quantized_nbytes(shape, up_bits, group_size)


def floe_staging_nbytes(cfg, round_experts: int, itemsize: int) -> int:
    """Device bytes of one round's staged gate columns and down rows at full capacity (a prefill's)."""
    return 2 * round_experts * cfg.moe_intermediate_size * cfg.hidden_size * itemsize


def floe_plan(cfg, *, budget: int | None, batch: int, prompt: int, context: int, dtype_itemsize: int,
              up_bits: int | None, group_size: int = FLOE_UP_GROUP) -> MemoryPlan:
    """floe's plan: every expert's up projection at `up_bits` (None: the checkpoint's dtype) as
    the resident "fallback"; gate and down stay on the host. The workspace adds the staging of
    one round (`batch` x `experts_per_token` experts' gate columns and down rows, at full
    capacity: a prefill's) and the up activations of the prefill's routed pairs. No slots."""
    g = floe_up_group(cfg, group_size)
    rounds = min(batch * cfg.experts_per_token, cfg.num_experts)
    pairs = batch * prompt * cfg.experts_per_token
    extra = floe_staging_nbytes(cfg, rounds, dtype_itemsize) + 2 * pairs * cfg.moe_intermediate_size * 4
    parts = dict(
        weights=non_expert_nbytes(cfg, dtype_itemsize),
        fallback=len(cfg.moe_layers) * floe_up_nbytes(cfg, up_bits, g, dtype_itemsize),
        kv_cache=kv_cache_nbytes(cfg, batch, context, dtype_itemsize),
        workspace=workspace_nbytes(cfg, batch, prompt, context, dtype_itemsize) + extra,
    )
    minimum = sum(parts.values())
    if budget is not None and budget < minimum:
        raise BudgetError(
            f"budget {format_size(budget)} cannot hold FloE's {format_name(up_bits) if up_bits else 'uncompressed'} up "
            f"projections, weights, KV cache and staging for batch {batch} x context {context}: the minimum is "
            f"{format_size(minimum)} ({minimum} bytes)")
    label = f"up projections ({format_name(up_bits) if up_bits else 'uncompressed'}; gate, down on the host)"
    return MemoryPlan(budget=budget, slot_bytes=0, slots=0, num_experts_total=len(cfg.moe_layers) * cfg.num_experts,
                      moe_layers=len(cfg.moe_layers), lo_bits=up_bits, fallback_label=label, **parts)
