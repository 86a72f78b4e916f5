"""The commands' options, one dataclass per concern, each flag declared once on its field.

    ModelOptions      which checkpoint, at what dtype, with the compile cache or not
    PlanOptions       the memory plan: the budget, and the run a dry run plans for
    PolicyOptions     the residency policy and its knobs (dynaexq's tiers, hotness; FloE's)
    SamplingOptions   new tokens and how they are drawn
    MeshOptions       expert parallelism over devices and processes
    BigLittleOptions  big-little routing, one setting (BigLittleSweep: a sweep of shares)
    PromptOptions     prompts from the command line, through the chat template or not
    OutputOptions     what a run prints

`EngineOptions` bundles the concerns on the way from flags to a running engine and checks
what lies between them. scripts/generate.py and scripts/serve.py take every group
(`add_engine_flags`); eval.py and bench.py take the groups, or the fields, they run with.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dynaexq_jax.budget import format_name
from dynaexq_jax.launch.flags import (
    FlagError,
    Options,
    above_zero,
    at_least,
    flag,
    host_port,
    int_or_word,
    name,
    none_or_int,
    utf8,
)
from dynaexq_jax.models.big_little import RULES, BigLittle
from dynaexq_jax.policies import POLICIES

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-qwen3-moe"
DEFAULT_CONTEXT = 1024  # tokens planned for --dry-run and --interactive when --context is not given


@dataclasses.dataclass(frozen=True)
class ModelOptions(Options):
    model: str = flag(str(DEFAULT_MODEL), "Hugging Face checkpoint directory (default: the shipped tiny model)")
    dtype: str = flag("bfloat16", "compute dtype of the activations and the non-expert weights",
                      choices=("bfloat16", "float32"))
    compile_cache: bool = flag(
        True, "reuse compiled steps from JAX's persistent cache (default on, in $XDG_CACHE_HOME/dynaexq/jax or "
              "~/.cache/dynaexq/jax; DYNAEXQ_COMPILE_CACHE=DIR moves it, =0 turns it off; deleting the directory "
              "is always safe)", action=argparse.BooleanOptionalAction)


@dataclasses.dataclass(frozen=True)
class PlanOptions(Options):
    GROUP = "memory plan"

    budget: str | None = flag(None, "device memory budget, e.g. 20GB, 20GiB, 5.5GB, 512MiB or plain bytes", group=None)
    dry_run: bool = flag(False, "print the memory plan from config.json (and the index) and exit without loading "
                                "weights", action="store_true")
    context: int | None = flag(
        None, f"tokens per sequence (prompt + new) planned by --dry-run and held by --interactive (default "
              f"{DEFAULT_CONTEXT}); a plain run plans exactly what its prompts need", type=int,
        check=at_least(2, "tokens (a prompt token and a new one)"))
    batch: int | None = flag(None, "sequences planned by --dry-run (default: the number of --prompt)", type=int,
                             check=at_least(1))

    def check(self) -> None:
        super().check()
        self.budget_bytes()

    def budget_bytes(self) -> int | None:
        from dynaexq_jax import budget

        return None if self.budget is None else budget.parse_size(self.budget)


@dataclasses.dataclass(frozen=True)
class PolicyOptions(Options):
    policy: str = flag(
        "dynaexq", "dynaexq: low-bit fallbacks + hot experts in high-precision slots; full: every expert at high "
                   "precision; static: every expert at one bit width (the widest the budget holds); offload: experts "
                   "on the host, an LRU cache of device slots loaded on demand; prefetch: offload + asynchronous "
                   "prefetch of the next layer's predicted experts; floe: compressed up projections resident, only "
                   "active gate/down channels streamed (FloE)", choices=POLICIES)
    floe_sparsity: float = flag(0.9, "share of up-projection channels dropped (calibrated by scripts/calibrate.py); "
                                     "0 keeps all", type=float, group="floe")
    floe_up_bits: int | None = flag(2, "width of the resident up projections (HQQ), or none (the checkpoint's dtype)",
                                    type=none_or_int, choices=(2, 3, 4, 8, None), group="floe")
    floe_calibration: str | None = flag(None, "calibration folder written by scripts/calibrate.py --out (default: the "
                                              "one saved for the checkpoint)", group="floe")
    hi_dtype: str = flag("auto", "dynaexq slot dtype (int4: over an int2/int3 fallback, DynaExq's 80B setting); auto: "
                                 "the one of least expected error in the budget among bfloat16 and int8",
                         choices=("auto", "bfloat16", "int8", "int4"))
    lo_bits: int | str = flag(
        "auto", "dynaexq (and static) fallback width; auto (with --budget): the plan picks it, a share of experts at "
                "the next wider width, and the slots, never below the widest static width that fits; mxfp4: OCP "
                "MXFP4 (4.25 bits), the checkpoint's own bytes when it ships MXFP4 (gpt-oss), else quantized from its "
                "weights", type=int_or_word, choices=("auto", 8, 4, 3, 2, "mxfp4"))
    group_size: int = flag(128, "quantization group (largest power of two <= this dividing the expert dims)", type=int,
                           check=at_least(8, "(the smallest group every width packs)"))
    quant_method: str = flag("rtn", "rtn: round to nearest; mse: each group's scale and zero fitted for least "
                                    "squared error",
                             choices=("rtn", "mse"))
    rebalance_every: int = flag(16, "decode steps between residency decisions", type=int, check=at_least(1))
    half_life: float = flag(256.0, "hotness half-life in decode steps (a prompt counts as one step per token)",
                            type=float, check=above_zero("a number of decode steps"))
    allocation: str = flag("per_layer", "per_layer: the slots shared out evenly over the MoE layers; global: the "
                                        "hottest (layer, expert) pairs of the whole model",
                           choices=("per_layer", "global"))
    hotness: str | None = flag(None, "warm-start hotness profile for dynaexq (JSON written by --save-hotness or "
                                     "scripts/build_tasks.py; record it on training data, not eval data)")
    save_hotness: str | None = flag(None, "write the run's hotness profile here (a new file, or one written by "
                                          "--save-hotness)")

    def check(self) -> None:
        super().check()
        if (self.hotness or self.save_hotness) and self.policy != "dynaexq":
            raise FlagError("--hotness and --save-hotness apply to --policy dynaexq; drop them or the --policy")
        if self.policy == "dynaexq":
            check_tiers(self.hi_dtype, self.lo_bits)

    def dynaexq(self):
        """The tiers and knobs as the policies take them (`policies.dynaexq.DynaExqOptions`)."""
        from dynaexq_jax.policies.dynaexq import DynaExqOptions

        return DynaExqOptions(lo_bits=self.lo_bits, hi_dtype=self.hi_dtype, group_size=self.group_size,
                              quant_method=self.quant_method, rebalance_every=self.rebalance_every,
                              half_life_steps=self.half_life, allocation=self.allocation)

    def floe(self):
        """FloE's knobs as its policy takes them (`policies.floe.FloeOptions`)."""
        from dynaexq_jax.policies.floe import FloeOptions

        return FloeOptions(up_bits=self.floe_up_bits, sparsity=self.floe_sparsity, calibration=self.floe_calibration)


FLOE_FLAGS = ("floe_sparsity", "floe_up_bits", "floe_calibration")
DYNAEXQ_FLAGS = ("rebalance_every", "half_life", "allocation")  # its residency decisions, which no other policy makes


def check_applies(policy: PolicyOptions, fields, runs: bool, owner: str, fix: str) -> None:
    """A policy's own knobs change nothing without it: given (other than their defaults) when no
    run uses `owner`, they are an error, not a silent no-op (`fix` says how to run it)."""
    given = [name(f) for f in fields if getattr(policy, f) != getattr(PolicyOptions, f)]
    if given and not runs:
        raise FlagError(f"{', '.join(given)} apply to {owner}; {fix}, or drop them")


SLOT_BITS = {"bfloat16": 16, "int8": 8, "int4": 4}
FALLBACK_BITS = {8: 8, 4: 4, 3: 3, 2: 2, "mxfp4": 4.25}


def check_tiers(hi_dtype: str, lo_bits, flags: str = "--hi-dtype {hi} over --lo-bits {lo}") -> None:
    """Slots must be wider than the fallback they stand in for: narrower slots would lose precision
    on promotion, and slots of the fallback's bits would spend memory on copies no better than
    what every expert already has (and count them as high-precision hits). `auto` on either side
    is the plan's to choose."""
    if "auto" in (hi_dtype, lo_bits):
        return
    hi, lo = SLOT_BITS[hi_dtype], FALLBACK_BITS[lo_bits]
    where = flags.format(hi=hi_dtype, lo=lo_bits)
    if hi < lo:
        raise FlagError(f"{where}: {hi_dtype} slots over an {format_name(lo_bits)} fallback would lose precision "
                        f"on promotion; pass a --lo-bits of at most {hi} or a wider --hi-dtype")
    if hi == lo:
        raise FlagError(f"{where}: {hi_dtype} slots are no wider than the {format_name(lo_bits)} fallback, so they "
                        "would add memory and no precision; pick a wider --hi-dtype (int8, bfloat16) or a narrower "
                        "--lo-bits")


@dataclasses.dataclass(frozen=True)
class SamplingOptions(Options):
    max_new_tokens: int = flag(64, "tokens to generate per sequence (at most)", type=int, check=at_least(1))
    temperature: float = flag(0.0, "0 = greedy", type=float)
    top_p: float = flag(1.0, "nucleus sampling: the smallest set of tokens holding this much probability", type=float)
    top_k: int = flag(0, "0 = off", type=int)
    seed: int = flag(0, "random seed", type=int)

    def check(self) -> None:
        super().check()
        self.params()

    def params(self):
        """`runtime.sampling.SamplingParams` (which checks each value)."""
        from dynaexq_jax.runtime.sampling import SamplingParams

        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)


@dataclasses.dataclass(frozen=True)
class MeshOptions(Options):
    GROUP = "mesh (expert parallel)"

    mesh: str | None = flag(None, "spread each layer's experts over N devices, e.g. expert=4 (everything else is "
                                  "replicated); budgets are then per device, and a memory plan is one device's")
    placement: str = flag("contiguous", "which device owns which experts: contiguous blocks of expert ids, or balanced "
                                        "by the expected load in the --hotness profile (greedy, as DeepSeek's EPLB "
                                        "without replicas)", choices=("contiguous", "balanced"))
    coordinator: str | None = flag(None, "HOST:PORT of process 0: join --num-processes processes into one mesh "
                                         "(jax.distributed; CPU collectives through gloo)", check=host_port)
    num_processes: int = flag(1, "processes joined by --coordinator", type=int, check=at_least(1))
    process_id: int = flag(0, "this process's index among them (0 writes stdout)", type=int, check=at_least(0))
    distributed_timeout: int = flag(60, "seconds to wait for the coordinator, and for a process that stops answering "
                                        "(the others then stop with one error line)", type=int, check=at_least(1))

    def check(self) -> None:
        super().check()
        if self.process_id >= self.num_processes:
            raise FlagError(f"--process-id {self.process_id} is not one of the --num-processes {self.num_processes} "
                            f"(0 to {self.num_processes - 1})")
        self.size()

    def size(self) -> int | None:
        """--mesh expert=N -> N (checked), None without --mesh."""
        from dynaexq_jax.runtime import mesh

        return None if self.mesh is None else mesh.parse_mesh(self.mesh)


_IMPORTANCE = ("router (default): per layer, little where the top --little-k hold at least the threshold share of "
               "the top-k router probability; first: that share at the first MoE layer, reused by every layer "
               "(prefetch plans with it)")


@dataclasses.dataclass(frozen=True)
class BigLittleOptions(Options):
    """One big-little setting (generate.py, serve.py)."""

    GROUP = "big-little routing (MoBiLE: unimportant tokens keep fewer experts)"

    big_little: bool = flag(False, "route tokens the importance rule marks unimportant to their top --little-k "
                                   "experts only", action="store_true")
    little_k: int | None = flag(None, "experts a little token keeps (default: half the model's top-k)", type=int)
    importance: str | None = flag(None, _IMPORTANCE, choices=RULES)
    little_threshold: float | None = flag(None, "kept share from which a token is little (default 0.7; above 1: none)",
                                          type=float)
    little_floor: float | None = flag(None, "fallback: a little token whose kept share at a layer is below this is "
                                            "computed big there (default 0: never)", type=float)

    def check(self) -> None:
        """Before any weight is read: a knob without --big-little is a mistake, not a silent no-op,
        and each knob's value is checked (little_k against the model later)."""
        super().check()
        if not self.big_little:
            for field in ("little_k", "importance", "little_threshold", "little_floor"):
                if getattr(self, field) is not None:
                    raise FlagError(f"{name(field)} applies to --big-little; add --big-little or drop {name(field)}")
            return
        self.setting(None)

    def setting(self, experts_per_token: int | None) -> BigLittle | None:
        """The routing these flags ask for; checked against the model's top-k when it is given."""
        if not self.big_little:
            return None
        d = BigLittle(1)
        little_k = self.little_k if self.little_k is not None else max(1, (experts_per_token or 2) // 2)
        bl = BigLittle(little_k, self.importance or d.rule,
                       d.threshold if self.little_threshold is None else self.little_threshold,
                       d.floor if self.little_floor is None else self.little_floor)
        return bl if experts_per_token is None else bl.checked(experts_per_token)


@dataclasses.dataclass(frozen=True)
class BigLittleSweep(BigLittleOptions):
    """Big-little over a sweep of target shares (eval.py, bench.py): a row per share."""

    little_threshold: float | None = None  # the sweep calibrates one per share: no flag
    little_shares: str = flag("0,0.25,0.5,0.75", "target shares of little tokens, each a row beside each plain row; "
                                                 "thresholds calibrated on sample text (0 = plain)")

    def sweep(self):
        """`eval.big_little.Sweep` (little_k is checked against the model when it is built)."""
        from dynaexq_jax.eval.big_little import Sweep

        self.check()
        if not self.big_little:
            if self.little_shares != BigLittleSweep.little_shares:
                raise FlagError("--little-shares applies to --big-little; add --big-little or drop --little-shares")
            return None
        try:
            shares = tuple(float(s) for s in self.little_shares.split(","))
        except ValueError:
            shares = ()
        if not shares or not all(0.0 <= s < 1.0 for s in shares):
            raise FlagError(f"--little-shares {self.little_shares!r}: give shares in [0, 1) separated by commas, "
                            "e.g. 0,0.25,0.5,0.75")
        return Sweep(self.little_k, self.importance or BigLittle(1).rule, self.little_floor or 0.0, shares)


@dataclasses.dataclass(frozen=True)
class PromptOptions(Options):
    GROUP = "chat"

    prompt: list[str] | None = flag(None, "prompt text; repeat for a batch (default: 'def ')", action="append",
                                    group=None, check=utf8)
    chat: bool | None = flag(None, "render each prompt as a user message with the model's chat template (default: on "
                                   "when the checkpoint has one)", action=argparse.BooleanOptionalAction)
    system: str | None = flag(None, "system message for --chat", check=utf8)
    thinking: bool | None = flag(None, "Qwen3's enable_thinking switch of the chat template (default: the template's)",
                                 action=argparse.BooleanOptionalAction)
    interactive: bool = flag(False, "converse on stdin, one message a line, reusing the KV cache across turns (EOF "
                                    "ends)", action="store_true")

    def check(self) -> None:
        if self.chat is False and (self.system is not None or self.thinking is not None):
            raise FlagError("--system and --thinking need the chat template; drop them or --no-chat")
        super().check()


@dataclasses.dataclass(frozen=True)
class OutputOptions(Options):
    GROUP = "output"

    json: bool = flag(False, "print one JSON object with outputs and stats on stdout", action="store_true")
    verbose: bool = flag(False, "print the memory plan, backend and device on stderr before loading, and the load, "
                                "convert, fill and compile times after the run", action="store_true")
    quiet: bool = flag(False, "no progress bar and no closing summary on stderr", action="store_true")

    def progress(self) -> bool:
        """Whether to draw progress bars: not --quiet, and stderr a terminal."""
        import sys

        return not self.quiet and sys.stderr.isatty()


# ----------------------------------------------------------------------------- the way to an engine

ENGINE_CONCERNS = (ModelOptions, PromptOptions, SamplingOptions, PolicyOptions, PlanOptions, OutputOptions,
                   BigLittleOptions, MeshOptions)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag on the way from a checkpoint to generated text (generate.py's, serve.py's)."""
    for concern in ENGINE_CONCERNS:
        concern.add_flags(parser)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The concerns from flags to a running engine, and the checks between them."""

    model: ModelOptions = ModelOptions()
    plan: PlanOptions = PlanOptions()
    policy: PolicyOptions = PolicyOptions()
    sampling: SamplingOptions = SamplingOptions()
    mesh: MeshOptions = MeshOptions()
    big_little: BigLittleOptions = BigLittleOptions()
    prompts: PromptOptions = PromptOptions()
    output: OutputOptions = OutputOptions()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EngineOptions":
        return cls(**{f.name: type(f.default).from_args(args) for f in dataclasses.fields(cls)})

    def check(self) -> None:
        """Each concern's checks, then those between them; nothing here reads a weight."""
        self.sampling.check()
        self.plan.check()
        self.prompts.check()
        self.policy.check()
        check_applies(self.policy, FLOE_FLAGS, self.policy.policy == "floe", "FloE", "pass --policy floe")
        check_applies(self.policy, DYNAEXQ_FLAGS, self.policy.policy == "dynaexq", "dynaexq",
                      "pass --policy dynaexq")
        self.big_little.check()
        self.mesh.check()
        devices = self.mesh.size()
        if devices is not None:
            from dynaexq_jax.runtime import mesh

            mesh.check_policy(self.policy.policy)
        if self.mesh.placement == "balanced" and (devices is None or not self.policy.hotness):
            raise FlagError("--placement balanced spreads the load of a --hotness profile over --mesh devices; "
                            "pass both, or drop --placement")
        if self.policy.save_hotness and not self.plan.dry_run:
            from dynaexq_jax.io import files

            files.check_output_file(self.policy.save_hotness, "--save-hotness")
