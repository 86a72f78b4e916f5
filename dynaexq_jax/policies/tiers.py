"""Expert tiers built from the checkpoint's host experts, shared by the policies.

Fallback formats: group-wise integer widths (`quant.QuantizedTensor`) and MXFP4
(`quant.Mxfp4Tensor`; a checkpoint that ships MXFP4 experts is served from its own bytes).

Conversion is one pass over the MoE layers (`convert`): each expert is read from its source
once (a mapped checkpoint, a preset made on the device), with the experts of its layer that go
to the same tiers (`_reads`), put on the device, and quantized there by one jitted call per
read and width its tiers want; a width bound for the device is written straight into its
stacked tier, and every width also goes to the converted-expert cache (`io.store`), streamed a
read at a time, so the host never holds more than the layer in flight. A later run maps the
cached arrays back instead: nothing is quantized twice.

Auto tiers rank experts by their quantization errors at every width (`quant_errors`): measured
on a stated sample, every `error_stride`-th output column of each matrix (a column's groups run
along K, so each sampled column is quantized exactly as in the full pass), in one cheap pass
before the tiers are chosen, and cached with the converted experts.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dynaexq_jax.budget import HI_BITS, MXFP4
from dynaexq_jax.experts import quant
from dynaexq_jax.experts.expert_state import (
    ExpertState,
    ExpertTier,
    HostExperts,
    device_biases,
    weights_nbytes,
    write_rows,
)
from dynaexq_jax.experts.swap import HostBank
from dynaexq_jax.io import store

_PIECES = ("gate_up", "down")
_LEAVES = {MXFP4: ("blocks", "scales")}
_INT_LEAVES = ("packed", "scales", "zeros")
# Columns of each matrix the sampled quantization errors measure, at least (of 768 to 6144 in
# the published models: a 1/12 to 1/96 sample, each column every row of K).
# A device tier bound for the cache on an accelerator is written from the finished tier in a
# background thread, in row blocks of at most this many device bytes (each sliced on the device,
# then copied to the host): the engine starts while the disk catches up.
BEHIND_BYTES = 256 << 20
# On the CPU a converted tier is the cache's mapped file itself (written as converted); False
# makes the CPU take the accelerators' write-behind path (tests of that path).
MAP_CPU_TIERS = True
_behind: list[threading.Thread] = []  # cache writes still running

ERROR_COLUMNS = 64


@dataclasses.dataclass
class Stopwatch:
    """Seconds spent getting converted experts (quantizing them, or reading them back from the
    converted-expert cache), summed over the calls it is passed to; a policy reports it as
    `convert_s`."""

    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Target:
    """One output of the conversion pass: every expert of `experts` ([L, E] bool; None: all) at
    width `bits` (an integer width or MXFP4), stacked on the device (`on_device`) or kept on
    the host per layer (a high-precision bank's copies)."""

    bits: int | str
    experts: np.ndarray | None = None
    on_device: bool = True

    def picks(self, layer: int, num_experts: int) -> np.ndarray:
        return np.arange(num_experts) if self.experts is None else np.flatnonzero(self.experts[layer])

    def rows(self, num_layers: int, num_experts: int) -> int:
        return num_layers * num_experts if self.experts is None else int(np.sum(self.experts))


def _leaf_names(bits) -> tuple[str, ...]:
    return _LEAVES.get(bits, _INT_LEAVES)


def _kind(bits) -> str:
    return MXFP4 if bits == MXFP4 else f"int{bits}"


def _settings(host: HostExperts, t: Target, group_size: int, method: str) -> dict:
    s = {"dtype": str(host.dtype)}
    if t.bits != MXFP4:
        s.update(bits=t.bits, group_size=group_size, method=method)
    if t.experts is not None:  # a subset (a mixed fallback's wider experts): its own entry
        s["experts"] = hashlib.sha256(np.packbits(np.asarray(t.experts, bool)).tobytes()).hexdigest()[:16]
    return s


def _quantize(w, bits, group_size: int, method: str):
    return quant.quantize_mxfp4(w) if bits == MXFP4 else quant.quantize(w, bits, group_size, method)


def _abstract(host: HostExperts, bits, group_size: int, rows: int):
    """(gate_up, down) of `rows` experts at `bits`, as abstract packed tensors (shapes only)."""
    return tuple(quant.abstract((rows,) + tuple(s[1:]), bits, group_size) for s in host.shapes)


def _spec(host: HostExperts, t: Target, group_size: int) -> dict:
    """The cache entry's arrays: one per matrix and packed leaf, every picked expert's rows,
    layer-major (so a CPU tier can be the mapped file itself)."""
    L, E = host.num_layers, host.num_experts
    spec = {}
    for name, w in zip(_PIECES, _abstract(host, t.bits, group_size, t.rows(L, E))):
        for leaf in _leaf_names(t.bits):
            a = getattr(w, leaf)
            spec[f"{name}/{leaf}"] = (a.shape, a.dtype)
    return spec


def _filled(abstract, arrays: dict):
    """The packed tensor `abstract` with its leaves from `arrays` {leaf: array}."""
    return dataclasses.replace(abstract, **arrays)


def _per_layer(tier, t: Target, L: int, E: int) -> list[tuple]:
    """A whole tier's (gate_up, down) [rows, ...] on the host as per-layer views [picks, ...]."""
    ends = np.cumsum([len(t.picks(i, E)) for i in range(L)])
    starts = np.concatenate([[0], ends[:-1]])
    return [tuple(_cut(w, a, b) for w in tier) for a, b in zip(starts, ends)]


def _cut(w, a: int, b: int):
    """Experts `a`..`b` of a host packed tensor (views)."""
    if (a, b) == (0, w.shape[0]):
        return w
    return dataclasses.replace(jax.tree.map(lambda x: x[a:b], w), shape=(int(b - a),) + tuple(w.shape[1:]))


class _Stack:
    """A device tier of `rows` experts (dense, or packed), filled as the layers come (donated
    in-place updates)."""

    def __init__(self, abstract, device):
        self.device, self.next, self.abstract = device, 0, abstract
        packed = isinstance(abstract, (quant.QuantizedTensor, quant.Mxfp4Tensor))
        self.names = _leaf_names(MXFP4 if isinstance(abstract, quant.Mxfp4Tensor) else 4) if packed else None
        self.buffers = [jnp.zeros(a.shape, a.dtype, device=device) for a in self._leaves(abstract)]

    def _leaves(self, w) -> list:
        return [w] if self.names is None else [getattr(w, n) for n in self.names]

    def write(self, block, rows: np.ndarray | None = None) -> None:
        """`block`'s rows into the tier's rows `rows` (repeats allowed, of the same row); None:
        appended after the last block appended."""
        put = lambda x: jax.device_put(x, self.device)
        if rows is None:
            start = put(np.int32(self.next))
            self.buffers = [write_rows(b, put(x), start) for b, x in zip(self.buffers, self._leaves(block))]
            self.next += block.shape[0]
        else:
            at = put(np.asarray(rows, np.int32))
            self.buffers = [_scatter_rows(b, put(x), at) for b, x in zip(self.buffers, self._leaves(block))]

    def tensor(self):
        return self.buffers[0] if self.names is None else _filled(self.abstract, dict(zip(self.names, self.buffers)))


@functools.partial(jax.jit, donate_argnums=0)
def _scatter_rows(buf, x, rows):
    return buf.at[rows].set(x)


def convert(host: HostExperts, targets: list[Target], group_size: int, method: str, *, source=None, device=None,
            room: int | None = None, progress: bool = False, clock: Stopwatch | None = None) -> list:
    """Every target in one pass over the layers. Returns, per target, (gate_up, down) stacked on
    `device` [rows, ...] layer-major (`on_device`), or per layer the host (gate_up, down) packed
    tensors [picked experts, ...] (views of the cache's mapped file where there is one).

    Targets found in the cache are mapped, not converted; the others share one read of each
    layer, quantized on `device`. A device target bound for the CPU is the mapped file itself
    (JAX's CPU client takes a read-only mapping without a copy); for an accelerator it is
    stacked there as the layers come (and copied to the cache). `room`: device bytes free for a
    conversion call's input (None: no limit); a layer that does not fit is converted in chunks
    of experts."""
    t0 = time.perf_counter()
    device = device or jax.devices()[0]
    on_cpu = device.platform == "cpu" and MAP_CPU_TIERS
    L, E = host.num_layers, host.num_experts
    abstract = {j: _abstract(host, t.bits, group_size, t.rows(L, E)) for j, t in enumerate(targets)}
    whole, per_layer, todo = {}, {}, []  # whole: a target's tier on the host; per_layer: its layers
    for j, t in enumerate(targets):
        if t.bits == MXFP4 and host.mxfp4 is not None:  # the checkpoint's own bytes: nothing to convert
            per_layer[j] = [tuple(w if t.experts is None else w[t.picks(i, E)] for w in host.mxfp4[i])
                            for i in range(L)]
            continue
        entry = store.entry(source, _kind(t.bits), _settings(host, t, group_size, method))
        tree = entry.read() if entry is not None else None
        if tree is not None:
            whole[j] = tuple(_filled(a, tree[name]) for name, a in zip(_PIECES, abstract[j]))
        else:
            todo.append((j, t, entry.writer(_spec(host, t, group_size)) if entry is not None else None))
    # Device tiers made layer by layer: converted ones (unless the CPU maps the cache's file), a
    # shipped MXFP4 tier's layers.
    stacks = {j: tuple(_Stack(a, device) for a in abstract[j])
              for j, t, w in todo if t.on_device and not (on_cpu and w is not None)}
    stacks.update({j: tuple(_Stack(a, device) for a in abstract[j]) for j in per_layer if targets[j].on_device})
    kept = {j: [] for j, t, w in todo if not t.on_device and w is None}  # host targets with no cache to go to
    layers = range(L)
    if todo:
        layers = tqdm(layers, desc="converting " + ", ".join(_kind(t.bits) for _, t, _ in todo), unit="layer",
                      file=sys.stderr, disable=not progress, leave=False)
    try:
        row = {j: 0 for j, _, _ in todo}
        reads = _reads({j: t for j, t, _ in todo}, L, E, _chunk(host, room)) if todo else None
        for i in layers:
            for j in per_layer:
                if j in stacks:
                    for stack, w in zip(stacks[j], per_layer[j][i]):
                        stack.write(w)
            if todo:
                _convert_layer(host, i, reads[i], todo, stacks, kept, row, group_size, method, device)
        for j, t, writer in todo:
            if writer is not None and j in stacks:
                continue  # written behind, from the finished tier
            if writer is not None:
                tree = store._nest(writer.commit())
                whole[j] = tuple(_filled(a, tree[name]) for name, a in zip(_PIECES, abstract[j]))
            elif not t.on_device:
                per_layer[j] = kept[j]
    except BaseException:
        for _, _, writer in todo:
            if writer is not None:
                writer.abort()
        raise
    out = []
    for j, t in enumerate(targets):
        if t.on_device:
            out.append(tuple(s.tensor() for s in stacks[j]) if j in stacks else jax.device_put(whole[j], device))
        else:
            out.append(per_layer[j] if j in per_layer else _per_layer(whole[j], t, L, E))
    for j, t, writer in todo:
        if writer is not None and j in stacks:
            _write_behind(writer, out[j], t.bits, room)
    if clock is not None:
        clock.seconds += time.perf_counter() - t0
    return out


def _write_behind(writer: store.ArrayWriter, tier: tuple, bits, room: int | None) -> None:
    """Write device tier `tier` (gate_up, down) into its cache entry from a background thread:
    row blocks of at most `BEHIND_BYTES` (and `room`) device bytes, the next block's copy to the
    host under way while one is written. The process exits once it is done (`wait_for_cache`);
    a failure leaves no entry (the writer's own rule)."""
    def run():
        try:
            for name, w in zip(_PIECES, tier):
                for leaf in _leaf_names(bits):
                    a = getattr(w, leaf)
                    n = a.shape[0]
                    limit = min(BEHIND_BYTES, room or BEHIND_BYTES) // 2  # two blocks in flight
                    rows = int(max(1, min(n, limit // max(a.nbytes // n, 1))))
                    take = jax.jit(lambda x, s, rows=rows: jax.lax.dynamic_slice_in_dim(x, s, rows))

                    def block(start, a=a, take=take, rows=rows):  # clamped to a full block; rows before start dropped
                        s = min(start, n - rows)
                        b = take(a, jnp.int32(s))
                        b.copy_to_host_async()
                        return start, s, b

                    pending = block(0)
                    for nxt in range(rows, n + rows, rows):
                        start, s, b = pending
                        pending = block(nxt) if nxt < n else None
                        writer.put(f"{name}/{leaf}", np.asarray(b)[start - s:], start)
            writer.commit()
        except Exception as e:  # the run goes on without the entry, as when a cache cannot be made
            writer.abort()
            store._warn(f"cannot write the expert cache ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                        "the next run converts again")

    thread = threading.Thread(target=run, name="cache-write-behind", daemon=True)  # joined at exit, below
    _behind.append(thread)
    thread.start()


def wait_for_cache() -> None:
    """Block until every converted tier being written behind is in the cache."""
    while _behind:
        _behind.pop().join()


@atexit.register  # after this module's import, so it runs before jax's own exit handlers
def _finish_cache_at_exit() -> None:
    if not any(t.is_alive() for t in _behind):
        return
    print("finishing the converted-expert cache before exiting (Ctrl-C skips it: the next run converts again)",
          file=sys.stderr, flush=True)
    try:
        wait_for_cache()
    except KeyboardInterrupt:  # the entry stays unfinished: a later run removes its temporary folder
        pass


def _chunk(host: HostExperts, room: int | None) -> int:
    """Experts per conversion call: all of a layer, or as many as `room` device bytes hold: the
    call's input in the checkpoint's dtype and the packed output (a quarter of it at most;
    XLA's own temporaries are a few MB:
    `jax.jit(quant._pack_codes).lower(...).compile().memory_analysis()`)."""
    E = host.num_experts
    if room is None:
        return E
    per_expert = sum(int(np.prod(s[1:])) for s in host.shapes) * host.dtype.itemsize * 5 // 4
    return int(max(1, min(E, room // max(per_expert, 1))))


def _reads(targets: dict[int, Target], L: int, E: int, n: int) -> list[list[tuple[tuple[int, ...], np.ndarray]]]:
    """Per layer, the conversion's reads: (the targets that take them, by their keys in
    `targets`; expert ids). Each expert
    of a layer is read once, with the experts every one of the same targets take, at most `n`
    a read (so no call quantizes an expert a target does not take); every read of the same
    targets has one length (one compilation, not one per layer): the group's longest over the
    layers, or `n`, the last read of a group padded by repeating its last expert."""
    keys = list(targets)
    member = [np.stack([np.isin(np.arange(E), targets[j].picks(i, E)) for j in keys], axis=1)
              for i in range(L)]  # per layer [E, targets]
    groups = []  # per layer: (targets, their experts)
    for m in member:
        sigs, inverse = np.unique(m, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        found = [(tuple(keys[k] for k in np.flatnonzero(sig)), np.flatnonzero(inverse == g))
                 for g, sig in enumerate(sigs) if sig.any()]
        groups.append(sorted(found, key=lambda g: g[1][0]))
    longest = {}
    for layer in groups:
        for who, ids in layer:
            longest[who] = max(longest.get(who, 0), len(ids))
    out = []
    for layer in groups:
        reads = []
        for who, ids in layer:
            size = min(n, longest[who])
            for a in range(0, len(ids), size):
                part = ids[a : a + size]
                reads.append((who, np.concatenate([part, np.full(size - len(part), part[-1])])))
        out.append(reads)
    return out


def _convert_layer(host, i, reads, todo, stacks, kept, row, group_size, method, device) -> None:
    """Layer `i`'s experts, read as `reads` says (`_reads`), each read quantized once per width
    its targets want and written at each target's rows: into its device stack, its cache
    entry's file (hashed once the layer is whole) or a kept host copy;
    `row`: each target's first row of this layer in its entry."""
    E = host.num_experts
    picks = {j: t.picks(i, E) for j, t, _ in todo}
    bits = {j: t.bits for j, t, _ in todo}
    shapes = {j: _abstract(host, bits[j], group_size, len(picks[j])) for j in kept}  # a kept layer's
    kept_now = {j: [{leaf: np.empty(getattr(a, leaf).shape, getattr(a, leaf).dtype) for leaf in _leaf_names(bits[j])}
                    for a in shapes[j]] for j in kept}  # per matrix, this layer's leaves
    for who, ids in reads:
        ws = host.on_device(i, device, experts=ids)
        for b in dict.fromkeys(bits[j] for j in who):
            for m, w in enumerate(ws):
                q = _quantize(w, b, group_size, method)
                for j, t, writer in todo:
                    if j not in who or bits[j] != b:
                        continue
                    at = np.searchsorted(picks[j], ids)  # the read's rows in the target's layer
                    if j in stacks:
                        stacks[j][m].write(q, row[j] + at)
                        continue
                    for leaf in _leaf_names(b):
                        x = np.asarray(getattr(q, leaf))  # on the CPU, a view of the device's buffer
                        if j in kept_now:
                            kept_now[j][m][leaf][at] = x
                        else:
                            writer.put_rows(f"{_PIECES[m]}/{leaf}", x, row[j] + at)
    for j, t, writer in todo:
        n = len(picks[j])
        if writer is not None and j not in stacks:
            for name in _PIECES:
                for leaf in _leaf_names(t.bits):
                    writer.written(f"{name}/{leaf}", row[j], row[j] + n)
        elif j in kept:
            kept[j].append(tuple(_filled(a, leaves) for a, leaves in zip(shapes[j], kept_now[j])))
        row[j] += n


def error_stride(n: int) -> int:
    """Every how many output columns the sampled errors measure, for a matrix of `n` columns."""
    return max(1, n // ERROR_COLUMNS)


def quant_errors(host: HostExperts, widths, group_size: int, method: str, *, source=None,
                 clock: Stopwatch | None = None, device=None) -> dict[int, np.ndarray]:
    """Each expert's relative weight error at each width in `widths`: {bits: [L, E] float64},
    ||W - Q(W)||^2 / ||W||^2 over its gate_up and down together, estimated from every
    `error_stride(N)`-th output column of each matrix (all of them below 2 x ERROR_COLUMNS
    columns; each matrix's sums scaled by its stride).

    Why this measure: it is what the output error of an expert is, relative to its output,
    for inputs with no preferred direction, so it needs no activations and is a property of
    the converted experts alone (cached beside them, computed once per checkpoint and
    settings); which experts matter comes from the traffic share of the calibration profile
    that weights it (`policies.autotier`).
    """
    t0 = time.perf_counter()
    device = device or jax.devices()[0]
    widths = tuple(sorted(widths))
    strides = tuple(error_stride(s[-1]) for s in host.shapes)

    qmaxes = jnp.asarray([2.0**b - 1 for b in widths], jnp.float32)

    def layer_errors(w) -> tuple:  # ([W, E], [E]) squared errors and norms of one sampled matrix
        if method == "rtn":  # every width in one call
            return quant.rtn_errors(w, qmaxes, group_size)
        return jnp.stack([_sq_err(w, quant.quantize(w, b, group_size, method)) for b in widths]), _sq_norm(w)

    def build() -> dict:
        out = {f"int{b}": np.zeros((host.num_layers, host.num_experts)) for b in widths}
        for i in range(host.num_layers):
            parts = [layer_errors(jax.device_put(c, device)) for c in host.columns(i, strides)]
            err = sum(s * e for s, (e, _) in zip(strides, parts))  # [W, E]
            norm = sum(s * n for s, (_, n) in zip(strides, parts))  # [E]
            rel = np.asarray(err / jnp.maximum(norm, 1e-30), np.float64)
            for k, b in enumerate(widths):
                out[f"int{b}"][i] = rel[k]
        return out

    settings = {"widths": list(widths), "group_size": group_size, "method": method, "dtype": str(host.dtype),
                "columns": ERROR_COLUMNS}
    tree = store.cached(source, "qerr", settings, build)
    if clock is not None:
        clock.seconds += time.perf_counter() - t0
    return {b: np.asarray(tree[f"int{b}"], np.float64) for b in widths}


@jax.jit
def _sq_norm(w):
    return jnp.sum(jnp.square(w.astype(jnp.float32)), axis=(1, 2))


@jax.jit
def _sq_err(w, q):
    return jnp.sum(jnp.square(quant.dequantize(q, jnp.float32) - w.astype(jnp.float32)), axis=(1, 2))


def quantized_layers(host: HostExperts, bits: int | str, group_size: int, method: str, *, source=None,
                     progress: bool = False, clock: Stopwatch | None = None) -> list[tuple]:
    """Every MoE layer's (gate_up, down) at `bits`, as host packed tensors [E, K, N] (mapped
    from the cache where there is one)."""
    (layers,) = convert(host, [Target(bits, on_device=False)], group_size, method, source=source, progress=progress,
                        clock=clock)
    return layers


def dense_tier(host: HostExperts, device=None) -> ExpertTier:
    """Every expert at the checkpoint's precision, rows [L*E] layer-major, on the device, each
    layer made there by its source (read once, never held twice on the host)."""
    device = device or jax.devices()[0]
    L, E = host.num_layers, host.num_experts
    stacks = [_Stack(jax.ShapeDtypeStruct((L * E,) + tuple(s[1:]), host.dtype), device) for s in host.shapes]
    for i in range(L):
        for s, w in zip(stacks, host.on_device(i, device)):
            s.write(w)
    return ExpertTier(stacks[0].tensor(), stacks[1].tensor(), high_precision=True)


def packed_tier(host: HostExperts, bits: int | str, group_size: int, method: str, *, source=None, device=None,
                room: int | None = None, progress: bool = False, clock: Stopwatch | None = None,
                high_precision: bool = False) -> ExpertTier:
    """Every expert at `bits`, stacked on the device, rows [L*E] layer-major."""
    ((gu, d),) = convert(host, [Target(bits)], group_size, method, source=source, device=device, room=room,
                         progress=progress, clock=clock)
    return ExpertTier(gu, d, high_precision=high_precision)


def fallback_and_bank(host: HostExperts, lo_bits, group_size: int, method: str, *, mid_bits: int | None = None,
                      mid: np.ndarray | None = None, bank_bits: int | None = None, source=None, device=None,
                      room: int | None = None, progress: bool = False,
                      clock: Stopwatch | None = None) -> tuple[ExpertState, list | None]:
    """dynaexq's conversions in one pass: every expert's fallback, at `mid_bits` where `mid`
    [L, E] is set and at `lo_bits` elsewhere (each stored once: tier 0 lo, tier 1 mid, rows
    layer-major within each), with the handles that find them and `host`'s expert biases; and,
    for int8/int4 slots (`bank_bits`), every expert's host copy at that width, per layer (RTN,
    whatever the fallback's method: a bank in another method is a second pass)."""
    device = device or jax.devices()[0]
    L, E = host.num_layers, host.num_experts
    mid = np.zeros((L, E), bool) if mid is None else np.asarray(mid, bool)
    fallback = [Target(lo_bits, ~mid)] + [Target(mid_bits, mid)] if mid.any() else [Target(lo_bits)]
    bank = [Target(bank_bits, on_device=False)] if bank_bits is not None else []
    run = lambda targets, m: convert(host, targets, group_size, m, source=source, device=device, room=room,
                                     progress=progress, clock=clock)
    out = run(fallback + bank, method) if method == "rtn" or not bank else run(fallback, method) + run(bank, "rtn")
    tiers = tuple(ExpertTier(gu, d, high_precision=False) for gu, d in out[: len(fallback)])
    tier_of = mid.astype(np.int32)
    row_of = np.zeros((L, E), np.int32)
    row_of[~mid] = np.arange(int((~mid).sum()))  # boolean indexing runs layer-major
    row_of[mid] = np.arange(int(mid.sum()))
    put = lambda a: jax.device_put(a, device)
    state = ExpertState(tiers=tiers, tier_of=put(tier_of), row_of=put(row_of), **device_biases(host, device))
    return state, (out[-1] if bank else None)


def slot_pool(host: HostExperts, slots: int, hi_dtype: str, group_size: int, device=None) -> ExpertTier:
    """`slots` empty high-precision slots: the checkpoint's dtype, or int8 / int4 (group-wise)."""
    if hi_dtype in HI_BITS:
        gu, d = _abstract(host, HI_BITS[hi_dtype], group_size, slots)
    else:
        gu, d = (jax.ShapeDtypeStruct((slots,) + tuple(s[1:]), host.dtype) for s in host.shapes)
    empty = lambda w: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=device), w)
    return ExpertTier(empty(gu), empty(d), high_precision=True)


def host_bank(host: HostExperts, hi_layers: list | None = None, device=None) -> HostBank:
    """Each expert's high-precision copy on the host, read on demand from memory that already
    exists: `hi_layers` (per layer, host packed tensors of every expert: the converted cache's
    mapping) or, without them, the checkpoint's own experts (its mapped files, or a preset's
    generator)."""
    if hi_layers is not None:
        one = lambda qt, e: dataclasses.replace(jax.tree.map(lambda a: a[e], qt), shape=qt.shape[1:])
        first = hi_layers[0]
        nbytes = sum(weights_nbytes(one(w, 0)) for w in first)
        kind = "mapped cache" if isinstance(jax.tree.leaves(first)[0], np.memmap) or \
            not jax.tree.leaves(first)[0].flags.owndata else "process memory"
        return HostBank(lambda l, e: tuple(one(w, e) for w in hi_layers[l]), nbytes, kind, device)
    nbytes = sum(int(np.prod(s[1:])) for s in host.shapes) * host.dtype.itemsize
    return HostBank(host.stored_expert, nbytes, getattr(host.gate_up, "memory_kind", "process memory"), device,
                    arrive=host.expert_in_layout)


def abstract_state(host: HostExperts, policy: str, plan, opts) -> ExpertState | None:
    """The expert state `policy` will publish for its first step, as shapes (before anything is
    converted): what the steps can be compiled against while the experts load. None for the
    policies whose steps run layer by layer (offload, prefetch, floe)."""
    L, E = host.num_layers, host.num_experts
    dense = lambda rows: tuple(jax.ShapeDtypeStruct((rows,) + tuple(s[1:]), host.dtype) for s in host.shapes)
    if policy == "full":
        tiers = [ExpertTier(*dense(L * E), high_precision=True)]
    elif policy == "static":
        tiers = [ExpertTier(*_abstract(host, plan.lo_bits, opts.group_size, L * E), high_precision=False)]
    elif policy == "dynaexq":
        mid = len(opts.mid_experts)
        tiers = [ExpertTier(*_abstract(host, b, opts.group_size, n), high_precision=False)
                 for b, n in ((opts.lo_bits, L * E - mid), (opts.mid_bits, mid)) if n]
        if plan.slots:
            hi = HI_BITS.get(opts.hi_dtype)
            pool = _abstract(host, hi, opts.group_size, plan.slots) if hi else dense(plan.slots)
            tiers.append(ExpertTier(*pool, high_precision=True))
    else:
        return None
    handles = jax.ShapeDtypeStruct((L, E), jnp.int32)
    biases = {} if host.gate_up_bias is None else {
        k: jax.ShapeDtypeStruct(getattr(host, k).shape, getattr(host, k).dtype) for k in ("gate_up_bias", "down_bias")}
    return ExpertState(tiers=tuple(tiers), tier_of=handles, row_of=handles, **biases)
