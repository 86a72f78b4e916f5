"""The engine's steps compiled for an NVIDIA Hopper GPU that is not here, and what they read.

XLA's GPU compiler runs without a GPU ("deviceless AOT"): with jax and its CUDA plugin
(`jax-cuda13-plugin`, `jax-cuda13-pjrt`) installed and `JAX_PLATFORMS=cpu`, a step lowered
for a target device made from a GPU description compiles to the optimized HLO and sm_90a
cubins (Pallas-Triton kernels included) an H100/H200 would run. Nothing is allocated: the
arguments are abstract shapes, so a 30B model compiles on a laptop. The GPU code paths are
chosen per lowering platform (`jax.lax.platform_dependent`), so this is the program a GPU runs.

What a step launches comes from the thunk sequence XLA's GPU backend emits for it (dumped at
compile time, `launches`): every kernel and copy with its executions per step (loop trip counts
applied; a loop with a known trip count never runs its condition), and whether it runs inside
a command buffer (a CUDA graph, launched whole) or is launched on its own. From the optimized
HLO it counts the bytes each kernel reads and writes: slices of an operand count as the slice,
in-place updates as the update. XLA counts custom calls (the Pallas kernels) as unknown, so
their bytes come from their tiling (`pallas_bytes`), under uniform routing. The minimum a step
must read (`min_bytes`): the non-expert weights it touches, the distinct experts its tokens
route to under uniform routing (at their tier), and the KV cache up to the context.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.errors import UserError
from dynaexq_jax.experts.expert_state import ExpertState, ExpertTier
from dynaexq_jax.experts.quant import Mxfp4Tensor, QuantizedTensor
from dynaexq_jax.models import deltanet
from dynaexq_jax.models.decoder import Decoder, KVCache
from dynaexq_jax.runtime import engine as engine_lib
from dynaexq_jax.runtime.costmodel import distinct_experts
from pallas_kernels.decode_attention import block_rows, num_splits

# name, HBM bytes/s (spec sheet), HBM bytes
GPUS = {
    "h100": ("NVIDIA H100 80GB HBM3", 3.35e12, 84929347584),
    "h200": ("NVIDIA H200", 4.8e12, 150754820096),
}
# Cost of one kernel in a step beyond its bytes, until a lent GPU measures it (gpu_check's device
# stage does, in a CUDA graph and out of one, and passes its figures to `predicted_s`). Fitted to
# the one measured step (H200, 2026-12-04, static int4 at batch 1: 5.66 ms for 1,517 kernels,
# 1,325 of them in graphs, and 3.6 GB, 0.74 ms at 4.8 TB/s): ~3.2 us a kernel, in a graph or not.
# Published microbenchmarks put a dependent kernel in a graph nearer 1-2 us; the fit says the
# decode step's small kernels paid more.
LAUNCH_S = 3.2e-6  # a kernel launched on its own, or a whole graph
GRAPH_KERNEL_S = 3.2e-6  # a kernel inside a graph

_INFO = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
             shared_memory_per_core=233472, threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
             block_dim_limit_x=2147483647, block_dim_limit_y=65535, block_dim_limit_z=65535,
             l2_cache_size=52428800, clock_rate_ghz=1.98, shared_memory_per_block_optin=232448,
             registers_per_core_limit=65536, registers_per_block_limit=65536)


class AotUnavailable(UserError):
    """The compile-only GPU stack is not installed."""


def target_config(gpu: str) -> str:
    """stream_executor.GpuTargetConfigProto text for an SXM Hopper (compute capability 9.0)."""
    name, bw, mem = GPUS[gpu]
    info = "".join(f"  {k}: {v}\n" for k, v in dict(_INFO, memory_bandwidth=int(bw), device_memory_size=mem).items())
    return (f"gpu_device_info {{\n{info}  cuda_compute_capability {{\n    major: 9\n  }}\n}}\n"
            f'platform_name: "CUDA"\ndnn_version_info {{\n  major: 9\n  minor: 7\n}}\n'
            f"runtime_version {{\n  major: 12\n  minor: 8\n  patch: 0\n}}\n"
            f'device_description_str: "{name}"\n')


@functools.lru_cache(maxsize=None)
def target_device(gpu: str):
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="cuda", target_config=target_config(gpu),
                                            topology="1x1x1").devices[0]
    except Exception as e:  # no CUDA plugin, or a backend already started without it
        raise AotUnavailable(
            f"cannot make a {gpu} target ({type(e).__name__}: {str(e).splitlines()[0][:120]}); install the "
            "compile-only stack (pip install -e '.[aot]', see README) and run with JAX_PLATFORMS=cpu"
        ) from None


@dataclasses.dataclass
class Compiled:
    executable: object  # jax's Compiled
    seconds: float  # lowering and compiling, wall clock
    cpu_seconds: float  # the same in this process's CPU time (what a shared machine's load does not inflate)
    thunks: str  # the thunk sequence XLA's GPU backend runs (after its passes: command buffers formed)
    thunk_metadata: str  # each thunk's id, kind and HLO instruction

    def as_text(self) -> str:
        return self.executable.as_text()


def compile_for(fn, args, gpu: str, command_buffer: str | None = None) -> Compiled:
    """`fn` (jitted) lowered for `gpu` from abstract `args` and compiled. `command_buffer`: XLA's
    `xla_gpu_enable_command_buffer`, the op kinds captured in CUDA graphs as a comma-separated
    list ("" for none; None: XLA's default, which leaves while loops out)."""
    dev = target_device(gpu)
    sharding = jax.sharding.SingleDeviceSharding(dev)
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    with tempfile.TemporaryDirectory() as dump:
        options = {"xla_dump_to": dump}
        if command_buffer is not None:
            options["xla_gpu_enable_command_buffer"] = command_buffer
        t0, c0 = time.perf_counter(), time.process_time()
        with jax.default_device(dev):  # Pallas on Triton reads the compute capability off the default device
            compiled = fn.lower(*args).compile(compiler_options=options)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        thunks = read_thunks(Path(dump))
        if thunks is None:
            raise RuntimeError(f"XLA wrote no thunk sequence for {gpu} "
                               f"(files: {sorted(p.name for p in Path(dump).glob('*.txt'))})")
        return Compiled(compiled, seconds, cpu_seconds, *thunks)


def read_thunks(dump: Path, module: str = "") -> tuple[str, str] | None:
    """(thunk sequence, thunk metadata) of the last module whose name holds `module` that XLA
    dumped into `dump` (`--xla_dump_to`): the sequence after its thunk passes where it wrote one.
    None where it wrote none (a compile that was not for a GPU)."""
    stem = f"*{module}*" if module else "*"
    seq = sorted(dump.glob(f"{stem}thunk_sequence_after_thunk_passes.txt")) or sorted(
        dump.glob(f"{stem}thunk_sequence.txt"))
    meta = sorted(dump.glob(f"{stem}thunk_metadata.txt"))
    return (seq[-1].read_text(), meta[-1].read_text()) if seq and meta else None


# --------------------------------------------------------------------------- HLO accounting

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": .5, "u4": .5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INST = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)(.*)$")
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "opt-barrier",
              "partition-id", "replica-id", "add-dependency", "domain", "fusion-done", "async-done"}
_SLICES = {"dynamic-slice", "slice", "gather"}


def nbytes(ty: str) -> int:
    return int(sum(math.prod(int(d) for d in dims.split(",") if d) * _BYTES.get(dt, 0)
                   for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", ty)))


def parse_hlo(text: str):
    """Optimized HLO text -> ({computation: [instruction dicts]}, entry computation name)."""
    comps, cur, entry = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"^(ENTRY\s+)?%?([\w.\-]+) \(.*\) -> .* \{$", line):
            cur = comps.setdefault(m.group(2), [])
            entry = m.group(2) if m.group(1) else entry
        elif cur is not None and (mi := _INST.match(line)):
            root, name, ty, op, args, rest = mi.groups()
            cur.append(dict(root=bool(root), name=name, ty=ty, op=op, rest=rest,
                            operands=re.findall(r"%([\w.\-]+)", args)))
    return comps, entry


@dataclasses.dataclass
class Kernel:
    label: str  # "fusion kLoop(add)", "custom-call pallas:tiled_matmul", ...
    name: str
    trips: int  # launches per step
    read: int  # bytes per launch (0 for Pallas kernels: see pallas_bytes)
    write: int
    pallas: str | None = None  # Pallas kernel name
    operands: tuple = ()  # operand types (Pallas kernels: for their own accounting)
    grid: tuple = ()
    tm: int = 0  # rows per tile (tiled kernels)
    rows: int = 0  # real rows of x (layer_matmul; its x is padded to whole tiles)


def _fused_io(comp: list[dict]) -> tuple[int, int]:
    """(read, write) bytes of one launch of a fused computation: a parameter used only through
    slices reads the slices; one only updated in place (dynamic-update-slice operand 0) reads
    nothing; an output made by such an update writes the update."""
    by_name = {x["name"]: x for x in comp}
    users: dict[str, list[dict]] = {}
    for x in comp:
        for o in x["operands"]:
            users.setdefault(o, []).append(x)

    def reads(name: str, full: int) -> int:
        total = 0
        for u in users.get(name, []):
            if u["op"] == "bitcast":
                total += reads(u["name"], full)
            elif u["op"] in _SLICES and u["operands"][0] == name:
                total += nbytes(u["ty"])
            elif u["op"] == "dynamic-update-slice" and u["operands"][0] == name:
                continue
            else:
                return full
        return min(total, full)

    read = sum(reads(x["name"], nbytes(x["ty"])) for x in comp if x["op"] == "parameter")
    root = next(x for x in comp if x["root"])
    write = 0
    for o in ([by_name[n] for n in root["operands"]] if root["op"] == "tuple" else [root]):
        if o["op"] == "dynamic-update-slice":
            write += nbytes(by_name[o["operands"][1]]["ty"])
        else:
            write += nbytes(o["ty"])
    return read, write


def kernels(text: str) -> list[Kernel]:
    """Every kernel launch of the HLO module, with trip counts of the loops around it."""
    comps, entry = parse_hlo(text)
    out: list[Kernel] = []

    def walk(comp_name: str, trips: int):
        insts = comps.get(comp_name, [])
        types = {x["name"]: x["ty"] for x in insts}
        for x in insts:
            op = x["op"]
            if op in ("while", "call", "conditional", "async-start"):
                n = re.search(r'"known_trip_count":\{"n":"(\d+)"', x["rest"]) if op == "while" else None
                head = x["rest"].split("metadata=")[0]
                if n:  # a known trip count: XLA runs the body n times and never the condition
                    head = re.sub(r"condition=%[\w.\-]+", "", head)
                called = [c for c in re.findall(r"%([\w.\-]+)", head) if c in comps]
                for c in called:
                    walk(c, trips * (int(n.group(1)) if n else 1))
                continue
            if op in _NO_KERNEL:
                continue
            fc = re.search(r"calls=%([\w.\-]+)", x["rest"])
            operand_types = [types.get(o, "") for o in x["operands"]]
            if op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', x["rest"]).group(1)
                name = re.search(r'op_name="[^"]*?/([a-z_]+?)(?:_tm(\d+))?(?:_m(\d+))?/pallas_call"', x["rest"])
                grid = tuple(int(g) for g in re.findall(r"grid_[xyz] = (\d+)", x["rest"]))
                if name:
                    out.append(Kernel(f"custom-call pallas:{name.group(1)}", x["name"], trips, 0, 0, name.group(1),
                                      tuple(operand_types), grid, int(name.group(2) or 0), int(name.group(3) or 0)))
                else:
                    out.append(Kernel(f"custom-call {target}", x["name"], trips, sum(map(nbytes, operand_types)),
                                      nbytes(x["ty"])))
                continue
            if fc and fc.group(1) in comps:
                comp = comps[fc.group(1)]
                kind = re.search(r"kind=(\w+)", x["rest"])
                root = next((y["op"] for y in comp if y["root"]), "?")
                label = f"{op} {kind.group(1) if kind else ''}({root})"
                r, w = _fused_io(comp)
                out.append(Kernel(label, x["name"], trips, r, w))
                continue
            out.append(Kernel(op, x["name"], trips, sum(map(nbytes, operand_types)), nbytes(x["ty"])))

    walk(entry, 1)
    return out


# ------------------------------------------------------------------ what the GPU is asked to run

# Thunks that only hold, order or wait for other thunks: no GPU work of their own.
_CONTAINERS = frozenset({"kWhile", "kConditional", "kSequential", "kCommandBuffer", "kAsyncStart", "kAsyncDone",
                         "kDynamicSliceFusion", "kWaitForStreams"})
_THUNK = re.compile(r"^(\s*)(\d+): (k\w+)")


@dataclasses.dataclass(frozen=True)
class Launch:
    """A thunk that runs work on the GPU: a kernel, a copy, a library call."""

    kind: str  # XLA's thunk kind: kCustomKernel, kKernel, kCopy, kGemm, ...
    name: str  # the HLO instruction it runs (its profile annotation)
    trips: int  # executions per step
    in_graph: bool  # inside a command buffer: a node of a CUDA graph, launched with the graph
    in_loop: bool = False  # in a while loop's body (the layer loop)


@dataclasses.dataclass(frozen=True)
class Launches:
    work: tuple[Launch, ...]
    graphs: int  # command buffers launched per step
    unknown_loops: int  # while loops without a known trip count (their bodies counted once)

    @property
    def kernels(self) -> int:
        """Kernels and copies the step executes, inside graphs or not."""
        return sum(w.trips for w in self.work)

    @property
    def in_graphs(self) -> int:
        return sum(w.trips for w in self.work if w.in_graph)

    @property
    def outside(self) -> int:
        """Launches the host makes: kernels outside any graph, and each graph launch."""
        return self.kernels - self.in_graphs + self.graphs

    @property
    def in_loops(self) -> int:
        """Kernels executed inside while loops (the layers' own, in a scanned decoder)."""
        return sum(w.trips for w in self.work if w.in_loop)


def trip_counts(hlo: str) -> dict[str, int]:
    """{while instruction: known trip count} of an optimized HLO module."""
    return {name: int(n) for name, n in
            re.findall(r"%([\w.\-]+) = .*? while\(.*?\"known_trip_count\":\{\"n\":\"(\d+)\"", hlo)}


def launches(sequence: str, metadata: str, trips_of: dict[str, int]) -> Launches:
    """The GPU work of a step from XLA's thunk sequence dump (indented tree: a while's
    `condition:` then `body:`, a command buffer's captured thunks beneath it) and its metadata
    (thunk id -> HLO instruction). A while with a known trip count runs its body that many times
    and never its condition (`WhileThunk::ExecuteOnStream`), unless it is inside a command buffer:
    there the condition runs on the device before every iteration and once more to stop. A
    command buffer is one launch per execution, its thunks nodes of the graph."""
    names = {int(i): n for n, i in re.findall(r'profile_annotation: "([^"]*)"\s*thunk_id: (\d+)', metadata)}
    work, graphs, unknown = [], 0, 0
    stack: list[dict] = []  # open thunks: indent, kind, trips of their children, in_graph of children
    for line in sequence.splitlines():
        label = line.strip()
        if label in ("condition:", "body:"):
            loop = next(t for t in reversed(stack) if t["kind"] == "kWhile")
            loop["part"] = label[:-1]
            continue
        m = _THUNK.match(line)
        if not m:
            continue
        indent, tid, kind = len(m.group(1)), int(m.group(2)), m.group(3)
        while stack and stack[-1]["indent"] >= indent:
            stack.pop()
        trips, in_graph, in_loop = 1, False, False
        if stack:
            parent = stack[-1]
            in_graph = parent["in_graph"] or parent["kind"] == "kCommandBuffer"
            in_loop = parent["in_loop"] or parent["kind"] == "kWhile"
            trips = parent["trips"]
            if parent["kind"] == "kWhile":
                n = parent["n"]
                if parent.get("part") == "condition":  # in a graph the predicate is computed on the device
                    trips = trips * (n + 1) if parent["in_graph"] and n is not None else 0 if n is not None else trips
                else:
                    trips *= n if n is not None else 1
        # A thunk nested in another without an instruction of its own (a fusion's copy) runs for it.
        name = names.get(tid) or (stack[-1]["name"] if stack else kind)
        n = trips_of.get(name) if kind == "kWhile" else None
        if kind == "kWhile" and n is None:
            unknown += 1
        if kind == "kCommandBuffer":
            graphs += trips
        elif kind not in _CONTAINERS and trips:
            work.append(Launch(kind, name, trips, in_graph, in_loop))
        stack.append(dict(indent=indent, kind=kind, trips=trips, in_graph=in_graph, in_loop=in_loop, n=n, name=name))
    return Launches(tuple(work), graphs, unknown)


def predicted_s(bytes_: int, runs: Launches, bandwidth: float, launch_s: float = LAUNCH_S,
                graph_kernel_s: float = GRAPH_KERNEL_S) -> float:
    """Step time the model predicts: bytes at `bandwidth`, each launch the host makes at
    `launch_s`, each kernel inside a graph at `graph_kernel_s`."""
    return bytes_ / bandwidth + runs.outside * launch_s + runs.in_graphs * graph_kernel_s


# ------------------------------------------------------------------- the Pallas kernels' bytes


@dataclasses.dataclass(frozen=True)
class Traffic:
    """What decides the data-dependent bytes of the Pallas kernels in one step."""

    distinct_experts: float  # expected experts a MoE layer routes to
    hi_fraction: float  # expected share of those served by the high-precision tier (tier 1)
    filled_slots: int  # KV slots a decode step reads (the context)
    num_experts: int
    pairs_per_expert: float  # mean routed rows of an expert (tokens * k / E)

    def tiles(self, tm: int) -> float:
        """Expected tiles of `tm` rows a layer's routed rows cut into: sum over experts of
        E[ceil(n / tm)], n ~ Poisson(mean rows per expert), the uniform-routing count."""
        lam = self.pairs_per_expert
        total, p, n = 0.0, math.exp(-lam), 0
        while n <= lam + 12 * math.sqrt(lam) + 50:
            total += p * math.ceil(n / tm)
            n += 1
            p *= lam / n
        return self.num_experts * total


def _dims(ty: str) -> tuple[str, tuple[int, ...]]:
    m = re.search(r"\b([a-z]+\d*)\[([\d,]*)\]", ty)
    return m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)


def pallas_bytes(k: Kernel, traffic: Traffic) -> int:
    """Bytes one launch of a Pallas kernel reads and writes, from its operands and tiling."""
    ops = [_dims(t) for t in k.operands]
    if k.pallas in ("tiled_matmul", "layer_matmul"):
        xi = next(i for i, (_, shape) in enumerate(ops) if len(shape) == 2)  # after the 1-D tile tables
        (_, (max_tiles,)), (xdt, (rows, K)) = ops[0], ops[xi]
        tiers = _tier_bytes(ops[xi + 1:], K)
        N = ops[xi + 1][1][-1]
        if k.pallas == "layer_matmul":
            used, per_tile, real = max_tiles, tiers[0], k.rows
        else:  # a tile per tm rows of each routed expert
            used, real = min(max_tiles, traffic.tiles(k.tm)), rows - k.tm
            fractions = [1.0] if len(tiers) == 1 else [1 - traffic.hi_fraction, traffic.hi_fraction]
            per_tile = sum(f * b for f, b in zip(fractions, tiers))
        # Row loads are masked to each tile's own rows, and the N blocks of a tile run together,
        # so L2 (50 MB on Hopper) serves their repeated reads: x counts once, real rows only.
        return int(used * per_tile + real * (K + N) * _BYTES[xdt])  # weights, x rows in, rows out
    if k.pallas == "decode_attention":  # (layer, index, q [B, Hq, D], kv [L, 2, B, KVH, S, D], start, windows?)
        (qdt, (B, Hq, D)), (kdt, kshape) = ops[2], ops[3]
        KVH = kshape[3]
        kv = 2 * B * KVH * traffic.filled_slots * D * _BYTES[kdt]
        partials = num_splits(B, KVH, kshape[4]) * B * KVH * block_rows(Hq // KVH) * (D + 2) * 4
        return int(kv + B * Hq * D * _BYTES[qdt] + partials)
    if k.pallas in _DECODE_LAYER:
        return _DECODE_LAYER[k.pallas](ops, traffic, k.tm)
    if k.pallas == "latent_attention":  # MLA: one latent entry per slot serves every head
        (qdt, (B, heads, D)), (cdt, cache) = ops[2], ops[3]
        splits = k.grid[2] if len(k.grid) == 3 else 1
        # Each block of heads reads the row's slots; the blocks of one row and split run together,
        # so L2 serves the repeats (as the tiled kernels' N blocks): the cache counts once.
        latent = B * traffic.filled_slots * cache[-1] * _BYTES[cdt]
        return int(latent + B * heads * D * _BYTES[qdt] + splits * B * heads * (D + 2) * 4)
    return 0


def _per_layer(ops) -> int:
    """Bytes of one layer's slice of stacked parameters [L, ...]."""
    return sum(math.prod(shape[1:]) * _BYTES[dt] for dt, shape in ops)


def _attn_in_bytes(ops, traffic, tm) -> int:
    """(layer, index, x1 [B, H], y [P, H], pos, norm [L, H], w [L, H, N], bias?, qk norm?, cos, sin, kv):
    the layer's weights, x1 and each row's pending expert rows read, x and every head written."""
    (xdt, (B, H)), (_, (P, _)) = ops[2], ops[3]
    N = ops[6][1][-1]
    return int(_per_layer(ops[5:-3]) + (B + P) * H * _BYTES[xdt] + B * H * _BYTES[xdt] + B * N * _BYTES[xdt]
               + 2 * B * ops[-3][1][-1] * _BYTES[ops[-3][0]])


def _attn_out_bytes(ops, traffic, tm) -> int:
    """(layer, o, m, l, x [B, H], w [L, Hq D, H], bias?, sinks?): the layer's weights, the partials
    once (each program re-reads them from L2), x read and the new residual written."""
    (xdt, (B, H)) = ops[4]
    partials = sum(math.prod(shape) * _BYTES[dt] for dt, shape in ops[1:4])
    return int(_per_layer(ops[5:]) + partials + 2 * B * H * _BYTES[xdt])


def _route_bytes(ops, traffic, tm) -> int:
    """(layer, moe, valid, x1 [B, H], norm, gate [L, H, E], bias?, tier_of, row_of, record [Lm, B, E]):
    the router's weights, x1, the normed rows written, the layer's handles and record row."""
    (xdt, (B, H)), (_, (_, _, E)) = ops[3], ops[5]
    return int(_per_layer(ops[4:-3]) + 2 * B * H * _BYTES[xdt] + 2 * E * 4 + B * E * 4)


def _expert_bytes(ops, traffic, tm) -> int:
    """(key, end, token | weight [Pa], x, the tiers' arrays, (moe, expert, bias)?): the weights of
    each used tile (a tile per tm rows of each routed expert, tiers in their expected shares), the
    pairs' rows in and out, their bias rows."""
    (xdt, (_, K)) = ops[3]
    tiers = ops[4:]
    bias = 0
    if len(tiers) >= 3 and tiers[-3] == ("s32", (1,)):  # the experts' biases, a row per pair
        bias = math.prod(tiers[-1][1][2:]) * _BYTES[tiers[-1][0]]
        tiers = tiers[:-3]
    per_tier = _tier_bytes(tiers, K)
    N = tiers[0][1][-1] if len(tiers[0][1]) == 3 else 0
    fractions = [1.0] if len(per_tier) == 1 else [1 - traffic.hi_fraction, traffic.hi_fraction]
    pairs = traffic.pairs_per_expert * traffic.num_experts
    used = traffic.tiles(tm)
    out = N // 2 if ops[2][0] == "s32" else N  # gate_up writes I of its 2I columns
    return int(used * sum(f * b for f, b in zip(fractions, per_tier)) + pairs * ((K + out) * _BYTES[xdt] + bias))


_DECODE_LAYER = {"attn_in": _attn_in_bytes, "attn_out": _attn_out_bytes, "moe_route": _route_bytes,
                 "moe_gate_up": _expert_bytes, "moe_down": _expert_bytes}


def _tier_bytes(ops, K) -> list[int]:
    """Bytes of one weight matrix [K, N] in each tier passed to the kernel: a dense tier is one
    array [R, K, N]; a packed one three ([R, K*bits/8, N] codes, [R, K/g, N] scales, zeros)."""
    out, i = [], 0
    while i < len(ops):
        dt, shape = ops[i]
        if dt == "u8" and shape[1] != K:  # packed codes: scales and zeros follow
            out.append(sum(math.prod(s[1:]) * _BYTES[d] for d, s in ops[i:i + 3]))
            i += 3
        else:
            out.append(math.prod(shape[1:]) * _BYTES[dt])
            i += 1
    return out


# -------------------------------------------------------------------------- the steps


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _packed(rows: int, K: int, N: int, bits: int | str, group: int) -> QuantizedTensor | Mxfp4Tensor:
    g = K // group
    if bits == budget_lib.MXFP4:
        return Mxfp4Tensor(_sds((rows, N, K // 2), "uint8"), _sds((rows, N, K // 32), "uint8"), (rows, K, N))
    return QuantizedTensor(_sds((rows, K * bits // 8, N), "uint8"), _sds((rows, g, N), "bfloat16"),
                           _sds((rows, g, N), "bfloat16"), bits, group, (rows, K, N))


def abstract_experts(cfg, policy: str, plan: budget_lib.MemoryPlan, *, dtype, hi_dtype: str, group: int):
    """The expert state `policy` runs with under `plan`, as shapes only (layer-major rows)."""
    L, E, H, I = len(cfg.moe_layers), cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size

    def dense(rows):
        return ExpertTier(_sds((rows, H, 2 * I), dtype), _sds((rows, I, H), dtype))

    def packed(rows, bits, hi=False):
        return ExpertTier(_packed(rows, H, 2 * I, bits, group), _packed(rows, I, H, bits, group), high_precision=hi)

    if policy == "full":
        tiers = (dense(L * E),)
    elif policy == "static" or (policy == "dynaexq" and plan.slots == 0):
        tiers = (packed(L * E, plan.lo_bits),)
    elif policy == "dynaexq":
        bits = budget_lib.HI_BITS.get(hi_dtype)
        hi = packed(plan.slots, bits, hi=True) if bits else dense(plan.slots)
        tiers = (packed(L * E, plan.lo_bits), hi)
    else:
        raise UserError(f"policy {policy!r} runs layer by layer from the host; aot_report compiles whole steps "
                        "(full, static, dynaexq)")
    biases = {}
    if cfg.expert_bias:
        biases = dict(gate_up_bias=_sds((L, E, 2 * I), dtype), down_bias=_sds((L, E, H), dtype))
    return ExpertState(tiers, _sds((L, E), "int32"), _sds((L, E), "int32"), **biases)


def step_args(cfg, experts, *, step: str, batch: int, context: int, prompt: int, dtype):
    """(jitted step, abstract arguments) of the engine's prefill or decode step."""
    decoder = Decoder(cfg, dtype)
    params = decoder.param_shapes()
    L, E = len(cfg.moe_layers), cfg.num_experts
    cache = jax.eval_shape(lambda: KVCache.empty(cfg, batch, context, dtype))  # linear layers' states included
    stats = jax.eval_shape(lambda: engine_lib.RoutingStats.zeros(L, E))
    key = jax.eval_shape(lambda: jax.random.key(0))
    knobs = (_sds((), "float32"), _sds((), "int32"), _sds((), "float32"), _sds((4,), "int32"))
    if step == "decode":
        state = engine_lib.DecodeState(_sds((batch,), "int32"), _sds((batch,), "int32"), _sds((batch,), bool),
                                       _sds((), "int32"))
        fn = jax.jit(functools.partial(engine_lib._decode, decoder, greedy=True), donate_argnums=(2,))
        return fn, (params, experts, cache, stats, state, key, knobs)
    toks = _sds((batch, prompt), "int32")
    fn = jax.jit(functools.partial(engine_lib._prefill, decoder, greedy=True, fresh=True), donate_argnums=(2,))
    return fn, (params, experts, cache, stats, toks, toks, _sds((batch, prompt), bool), key, knobs)


def expert_bytes(cfg, tier_bits: int | None, itemsize: int, group: int) -> int:
    """One expert's gate_up + down at `tier_bits` (None: dense at `itemsize`)."""
    gu, dn = budget_lib.expert_shapes(cfg)
    if tier_bits is None:
        return (math.prod(gu) + math.prod(dn)) * itemsize
    return budget_lib.quantized_nbytes(gu, tier_bits, group) + budget_lib.quantized_nbytes(dn, tier_bits, group)


def traffic_and_min(cfg, policy: str, plan, *, step: str, batch: int, context: int, prompt: int, itemsize: int,
                    hi_dtype: str, group: int) -> tuple[Traffic, int]:
    """The expected routing traffic and the minimum bytes of one step (see module doc)."""
    L, E, H, V = len(cfg.moe_layers), cfg.num_experts, cfg.hidden_size, cfg.vocab_size
    tokens = batch * (1 if step == "decode" else prompt)
    D = distinct_experts(E, cfg.experts_per_token, tokens)
    if policy == "full":
        per_expert, hi = expert_bytes(cfg, None, itemsize, group), 1.0
    elif policy == "static" or plan.slots == 0:
        per_expert, hi = expert_bytes(cfg, plan.lo_bits, itemsize, group), 0.0
    else:
        hi = min(1.0, plan.slots / (L * E))  # uniform residency: each expert equally likely slotted
        hi_bytes = expert_bytes(cfg, budget_lib.HI_BITS.get(hi_dtype), itemsize, group)
        per_expert = hi * hi_bytes + (1 - hi) * expert_bytes(cfg, plan.lo_bits, itemsize, group)
    # Non-expert weights, minus the embedding table (a step reads only its tokens' rows).
    weights = budget_lib.non_expert_nbytes(cfg, itemsize) - (0 if cfg.tie_word_embeddings else V * H * itemsize)
    weights += tokens * H * itemsize
    dtype = jnp.dtype({2: "bfloat16", 4: "float32"}[itemsize])
    # The linear layers' states are read whole by every step; the KV cache up to the filled slots.
    states = deltanet.state_nbytes(cfg, batch, dtype) if cfg.linear_layers else 0
    kv = KVCache.nbytes_for(cfg, batch, context, dtype) - states
    filled = context if step == "decode" else prompt
    traffic = Traffic(D, hi, filled, E, tokens * cfg.experts_per_token / E)
    return traffic, int(weights + L * D * per_expert + kv * filled // context + states)


def measured_step(eng, plan, policy: str, *, batch: int, prompt: int, gen: int, costs: dict,
                  dump: Path | None) -> dict:
    """An engine's last compiled decode step accounted as `report_step` does (its thunks read
    from `dump`, where XLA was told to write them, so its launches and graphs count), with the
    step time predicted at the device's measured `costs` (bandwidth_gbs, launch_s,
    graph_kernel_s; any None: the model's own figures) for a `prompt` + `gen` generation."""
    cfg = eng.cfg
    decode = [v for k, v in eng._compiled.items() if k[0] == "decode"][-1]
    thunks = read_thunks(dump, "jit__decode") if dump is not None else None
    # (the engine timed its own compiles; only their thunks are read here)
    compiled = Compiled(decode, eng.compile_s, float("nan"), *thunks) if thunks else decode
    context = prompt + gen // 2  # the slots an average measured step reads
    traffic, minimum = traffic_and_min(cfg, policy, plan, step="decode", batch=batch, context=context, prompt=prompt,
                                       itemsize=2, hi_dtype="bfloat16", group=budget_lib.expert_group_size(cfg))
    r = report_step(compiled, traffic)
    if None in costs.values():
        costs = {"bandwidth_gbs": GPUS["h200"][1] / 1e9, "launch_s": LAUNCH_S, "graph_kernel_s": GRAPH_KERNEL_S}
    seconds = predicted_s(r["bytes"], r["runs"], costs["bandwidth_gbs"] * 1e9, costs["launch_s"],
                          costs["graph_kernel_s"])
    return {"launches": r["launches"], "in_graphs": r["in_graphs"], "host_launches": r["outside_graphs"],
            "bytes": r["bytes"], "min_bytes": minimum, "predicted_step_s": seconds}


def decode_min_bytes(cfg, policy: str, plan, *, batch: int, prompt_len: int, gen_len: int, itemsize: int,
                     hi_dtype: str, group_size: int) -> int:
    """The bytes a decode step of a `prompt_len` + `gen_len` generation must read at least
    (`traffic_and_min`), at the mean real context over its decode steps."""
    _, nbytes = traffic_and_min(
        # offload and prefetch compute with every routed expert in its bf16 slot, as `full` does.
        cfg, "full" if policy in ("offload", "prefetch") else policy, plan, step="decode", batch=batch,
        # The mean real context over the decode steps: the KV slots a step reads on average.
        context=prompt_len + gen_len // 2, prompt=prompt_len, itemsize=itemsize, hi_dtype=hi_dtype,
        group=budget_lib.expert_group_size(cfg, group_size),
    )
    return nbytes


def kernel_bytes(k: Kernel, traffic: Traffic) -> int:
    """Bytes one launch of `k` reads and writes."""
    return k.read + k.write if k.pallas is None else pallas_bytes(k, traffic)


def report_step(compiled, traffic: Traffic) -> dict:
    """Launches, bytes (from the HLO) and temporaries of a compiled step: a `Compiled` (its
    launches from its thunks), or jax's own compiled step of a backend without thunk dumps
    (the CPU: launches from the HLO's kernels, none in graphs)."""
    hlo = compiled.as_text()
    ks = kernels(hlo)
    if isinstance(compiled, Compiled):
        runs = launches(compiled.thunks, compiled.thunk_metadata, trip_counts(hlo))
        executable = compiled.executable
    else:
        runs = Launches(tuple(Launch("hlo", k.name, k.trips, False, k.trips > 1) for k in ks), 0, 0)
        executable = compiled
    xla = sum(k.trips * (k.read + k.write) for k in ks if k.pallas is None)
    pallas = sum(k.trips * pallas_bytes(k, traffic) for k in ks if k.pallas is not None)
    return {
        "kernels": len(ks),
        "launches": runs.kernels,
        "in_graphs": runs.in_graphs,
        "graphs": runs.graphs,
        "outside_graphs": runs.outside,
        "in_loops": runs.in_loops,
        "unknown_loops": runs.unknown_loops,
        "xla_bytes": int(xla),
        "pallas_bytes": int(pallas),
        "bytes": int(xla + pallas),
        "temp_bytes": executable.memory_analysis().temp_size_in_bytes,
        "by_kernel": ks,
        "runs": runs,
    }
