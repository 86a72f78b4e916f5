"""Accuracy evaluation of any residency policy: perplexity, multiple choice, exact match.

Every task runs as batched forwards of one jitted scorer over left-padded, power-of-two
length buckets (the engine's layout); the log-softmax and the gather of each next token's
log-probability happen inside the jit, so only [B, T] floats come back to the host.

Batch independence. A sequence's scores must not depend on what shares its batch: padded
positions are masked out of attention and out of the routing trace, every row is scored on
its own, and a dynaexq runtime's residency never changes in the middle of a pass (see
`Residency`), so results are identical for any batch size.

Tasks (JSONL, one object a line):
  perplexity       `{"text": ...}` per document, or any other file read as one document
  multiple choice  `{"context": str, "choices": [str, ...], "answer": int}`; the score of a
                   choice is the log-likelihood of its tokens after the context's; `acc` takes
                   the best sum, `acc_norm` the best sum per character of the choice
  exact match      `{"prompt": str, "answer": str}`; greedy generation, compared on its first
                   non-empty line, stripped, against the answer stripped
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.runtime import engine as engine_lib
from dynaexq_jax import policies
from dynaexq_jax.errors import UserError
from dynaexq_jax.models.decoder import KVCache
from dynaexq_jax.runtime.sampling import SamplingParams

TASK_KINDS = ("ppl", "mc", "em")
RESIDENCY_MODES = ("pass", "batch", "frozen")


class TaskError(UserError):
    """A task file is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class Result:
    policy: str
    budget_bytes: int | None
    task: str
    metric: str
    value: float
    n: int  # scored tokens (perplexity) or items
    run: str  # e.g. "static int8 (budget int4+25%)", "dynaexq int4+25%": tells rows of one policy apart
    bits: int  # static: the width used; dynaexq: the fallback width; others (all high precision): 16


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str  # one of TASK_KINDS
    name: str
    items: list  # ppl: [str] documents; mc/em: [dict]


# ----------------------------------------------------------------------------- task files


def _read_jsonl(path: Path) -> list[dict]:
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{i} is not valid JSON ({e.msg}); write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{path}:{i} is not a JSON object; write one object per line")
        items.append(obj)
    return items


def _need(path: Path, i: int, obj: dict, key: str, kind: type):
    if not isinstance(obj.get(key), kind):
        raise TaskError(f"{path}:{i} needs a {kind.__name__} field {key!r}; see the task formats in dynaexq_jax/evaluate.py")
    return obj[key]


def load_task(kind: str, path: str | Path) -> Task:
    """Read and check a task file of `kind` ("ppl", "mc" or "em")."""
    path = Path(path)
    if kind not in TASK_KINDS:
        raise TaskError(f"unknown task kind {kind!r}; choose one of {', '.join(TASK_KINDS)}")
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist; build the shipped ones with scripts/build_tasks.py")
    if kind == "ppl":
        if path.suffix == ".jsonl":
            docs = [_need(path, i, o, "text", str) for i, o in enumerate(_read_jsonl(path), 1)]
        else:
            docs = [path.read_text(encoding="utf-8")]
        items = [d for d in docs if d]
    else:
        items = _read_jsonl(path)
        for i, o in enumerate(items, 1):
            if kind == "mc":
                _need(path, i, o, "context", str)
                choices = _need(path, i, o, "choices", list)
                if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                    raise TaskError(f"{path}:{i} needs at least two non-empty string choices")
                answer = o.get("answer")
                if not isinstance(answer, int) or not 0 <= answer < len(choices):
                    raise TaskError(f"{path}:{i} answer must be an index into its {len(choices)} choices")
            else:
                _need(path, i, o, "prompt", str)
                _need(path, i, o, "answer", str)
    if not items:
        raise TaskError(f"task file {path} holds no items")
    return Task(kind, path.name.split(".")[0], items)


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """Log-probability of every next token, for a batch of token sequences, in one jit.

    `__call__(seqs)` -> ([len_i - 1] float32 per sequence: log p(seq[t] | seq[:t]) for
    t = 1.., routing counts [moe_layers, E] of the batch's real tokens). Engines other than
    `engine.Engine` (the offloading baselines run layer by layer from Python) are scored
    through their own `logits`, on the host, without routing counts (None).
    """

    def __init__(self, engine):
        self.engine = engine
        self.jitted = isinstance(engine, engine_lib.Engine)
        if not self.jitted:
            return
        cfg, dtype = engine.cfg, engine.checkpoint.dtype

        def score(params, experts, tokens, positions, valid):  # [B, P] each
            B, P = tokens.shape
            cache = KVCache.empty(cfg, B, P, dtype)
            logits, _, trace = engine.model.apply({"params": params}, tokens, positions, valid, cache, experts)
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [B, P-1, V] float32
            picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, P-1]
            return picked, trace["counts"]

        self._score = jax.jit(score)

    def __call__(self, seqs: Sequence[Sequence[int]], length: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """`length`: the padded length (default: the batch's bucket). A task passes its own
        longest bucket, so a sequence's padding, hence its float rounding, never depends on
        which other sequences share its batch."""
        if not self.jitted:
            return [_next_token_logp(l, s) for l, s in zip(self.engine.logits(seqs), seqs)], None
        P = length or engine_lib.prompt_bucket(max(len(s) for s in seqs))
        tokens, positions, valid = engine_lib.left_pad(seqs, P)
        rt = self.engine.runtime
        rt.before_step()
        lp, counts = self._score(self.engine.params, rt.experts, tokens, positions, valid)
        lp, counts = np.asarray(lp), np.asarray(counts)
        rt.observe(counts, int(valid.sum()))
        return [lp[b, P - len(s) : P - 1] for b, s in enumerate(seqs)], counts


def _next_token_logp(logits: np.ndarray, seq: Sequence[int]) -> np.ndarray:
    """logits [len, V] -> log p(seq[t] | seq[:t]) for t = 1.., [len - 1] float32."""
    z = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return logp[np.arange(len(seq) - 1), np.asarray(seq[1:])].astype(np.float32)


# ----------------------------------------------------------------------------- residency


class Residency:
    """Drives a dynaexq runtime through an evaluation, deterministically.

    The engine is given a stand-in runtime with the same experts whose `observe` only sums
    the routing trace, so no swap starts or lands mid-pass. The trace is then folded into
    hotness and the new resident set landed completely (the warm start's procedure):
      pass    after each task pass (batch-size independent; the default)
      batch   after each batch (closer to serving, but depends on the batch size)
      frozen  never: the warm-start residency throughout
    Other runtimes are driven as the engine drives them (before_step / observe per step).
    """

    def __init__(self, engine, mode: str):
        if mode not in RESIDENCY_MODES:
            raise UserError(f"unknown residency mode {mode!r}; choose one of {', '.join(RESIDENCY_MODES)}")
        self.engine = engine
        self.mode = mode
        self.runtime = getattr(engine, "runtime", None)
        self.managed = isinstance(self.runtime, policies.DynaExqRuntime)
        self.counts = None  # [moe_layers, E] routed pairs since the last settle
        self.tokens = 0
        self.pairs = 0.0  # routed pairs this pass, and how many hit a high-precision slot
        self.hi_pairs = 0.0
        if self.managed:
            engine.runtime = self

    # the runtime interface the engine calls
    @property
    def experts(self):
        return self.runtime.experts

    def before_step(self) -> None:
        pass

    def observe(self, counts: np.ndarray, tokens: int) -> None:
        self.counts = counts.copy() if self.counts is None else self.counts + counts
        self.tokens += tokens
        resident = np.asarray(self.runtime.swapper.slot_of) >= 0  # [moe_layers, E]
        self.pairs += float(counts.sum())
        self.hi_pairs += float(counts[resident].sum())

    def stats(self) -> dict:
        return self.runtime.stats()

    # called by the evaluation loop
    def after_batch(self) -> None:
        if self.managed and self.mode == "batch":
            self._settle()

    def after_pass(self) -> float | None:
        """End of a task pass: settle, and return the pass's high-precision pair share."""
        if not self.managed:
            return None
        share = self.hi_pairs / self.pairs if self.pairs else None
        if self.mode == "pass":
            self._settle()
        self.counts, self.tokens, self.pairs, self.hi_pairs = None, 0, 0.0, 0.0
        return share

    def close(self) -> None:
        if self.managed:
            self.engine.runtime = self.runtime

    def _settle(self) -> None:
        if self.mode == "frozen" or not self.tokens:
            return
        rt = self.runtime
        rt.tracker.update(self.counts, self.tokens)
        self.counts, self.tokens = None, 0
        rt.rebalance()
        sw = rt.swapper
        while sw.pending or sw.inflight:
            jax.block_until_ready([t.result() for _, t in sw.inflight.values()])
            sw.poll()


def _batches(order: Sequence[int], size: int):
    return [order[i : i + size] for i in range(0, len(order), size)]


def _by_length(lengths: Sequence[int]) -> list[int]:
    """Indices longest first: batches of similar length waste less padding."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def ppl_sequences(tok, docs: Sequence[str], eos_id: int, window: int) -> list[list[int]]:
    """Documents joined by EOS (one after each), cut into windows of `window` tokens that
    overlap by one token, so every token after the first is scored exactly once."""
    stream = []
    for enc in tok.encode_batch(list(docs), add_special_tokens=False):
        stream += enc.ids + [eos_id]
    step = window - 1
    return [stream[i : i + window] for i in range(0, max(len(stream) - 1, 1), step) if len(stream[i : i + window]) > 1]


def mc_sequences(tok, items: Sequence[dict], max_length: int) -> tuple[list[list[int]], list[int]]:
    """One sequence per (item, choice): context ids (left-truncated to fit) + choice ids.
    -> (sequences, number of choice tokens of each)."""
    seqs, n_cont = [], []
    for it in items:
        ctx = tok.encode(it["context"], add_special_tokens=False).ids
        for choice in it["choices"]:
            cont = tok.encode(choice, add_special_tokens=False).ids
            if len(cont) >= max_length:
                raise TaskError(f"a choice of {len(cont)} tokens does not fit --max-length {max_length}")
            keep = max_length - len(cont)
            seqs.append((ctx[-keep:] if ctx else []) + cont)
            n_cont.append(len(cont))
    return seqs, n_cont


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


class Evaluator:
    """Runs tasks on one engine. `batch_size` sequences per forward (or prompts per generate)."""

    def __init__(self, engine, *, batch_size: int = 16, window: int = 256, max_length: int = 512,
                 max_new_tokens: int = 32, residency: str = "pass", progress: bool = False, label: str = ""):
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if window < 2:
            raise UserError(f"perplexity window must be >= 2 tokens, got {window}")
        self.engine = engine
        self.tok = engine.checkpoint.tokenizer
        if self.tok is None:
            raise UserError(f"{engine.checkpoint.path} has no tokenizer.json, so task text cannot be encoded")
        self.batch_size = batch_size
        self.window = window
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.residency = residency
        self.progress = progress
        self.label = label
        self.scorer = Scorer(engine)

    def run(self, tasks: Sequence[Task]) -> list[tuple[str, str, float, int]]:
        """-> [(task, metric, value, n)]; a dynaexq run adds each task's `hi_pair_share`."""
        res = Residency(self.engine, self.residency)
        plans = [(t, self._plan(t)) for t in tasks]
        total = sum(len(batches) for _, (batches, _, _) in plans)
        rows = []
        with tqdm(total=total, desc=self.label or "eval", file=sys.stderr, disable=not self.progress,
                  dynamic_ncols=True, leave=False) as bar:
            try:
                for task, (batches, run_batch, finish) in plans:
                    outputs = []
                    for batch in batches:
                        outputs.append(run_batch(batch))
                        res.after_batch()
                        bar.update(1)
                    rows += [(task.name, m, v, n) for m, v, n in finish(outputs)]
                    share = res.after_pass()
                    if share is not None:
                        rows.append((task.name, "hi_pair_share", share, 0))
            finally:
                res.close()
        return rows

    def _plan(self, task: Task):
        """-> (batches, run_batch(batch) -> output, finish([outputs]) -> [(metric, value, n)])."""
        B = self.batch_size
        if task.kind == "ppl":
            eos = self.engine.checkpoint.eos_token_ids
            if not eos:
                raise UserError("perplexity joins documents with EOS, but the checkpoint names no eos_token_id")
            seqs = ppl_sequences(self.tok, task.items, eos[0], self.window)
            P = engine_lib.prompt_bucket(max(map(len, seqs)))

            def finish(outs):
                lps = np.concatenate([lp for out in outs for lp in out])
                nll = -float(np.sum(lps, dtype=np.float64)) / len(lps)
                return [("ppl", math.exp(nll), len(lps))]

            return _batches(seqs, B), lambda batch: self.scorer(batch, P)[0], finish

        if task.kind == "mc":
            seqs, n_cont = mc_sequences(self.tok, task.items, self.max_length)
            order = _by_length([len(s) for s in seqs])
            P = engine_lib.prompt_bucket(max(map(len, seqs)))

            def run_batch(idx):
                lps, _ = self.scorer([seqs[i] for i in idx], P)
                return [(i, float(np.sum(lp[len(lp) - n_cont[i] :], dtype=np.float64))) for i, lp in zip(idx, lps)]

            def finish(outs):
                ll = dict(pair for out in outs for pair in out)  # sequence index -> log-likelihood
                correct = correct_norm = 0
                k = 0
                for it in task.items:
                    scores = np.array([ll[k + j] for j in range(len(it["choices"]))])
                    chars = np.array([len(c) for c in it["choices"]])
                    correct += int(np.argmax(scores)) == it["answer"]
                    correct_norm += int(np.argmax(scores / chars)) == it["answer"]
                    k += len(it["choices"])
                n = len(task.items)
                return [("acc", correct / n, n), ("acc_norm", correct_norm / n, n)]

            return _batches(order, B), run_batch, finish

        # Prompts are left-truncated like multiple-choice contexts: the engine is sized for max_length.
        prompts = [self.tok.encode(it["prompt"], add_special_tokens=False).ids[-self.max_length :] for it in task.items]
        if any(not p for p in prompts):
            raise TaskError(f"task {task.name}: every prompt must encode to at least one token")
        order = _by_length([len(p) for p in prompts])

        def run_gen(idx):
            gen = self.engine.generate([prompts[i] for i in idx], self.max_new_tokens, SamplingParams())
            texts = self.tok.decode_batch(gen.tokens, skip_special_tokens=True)
            return [(i, first_line(t)) for i, t in zip(idx, texts)]

        def finish_em(outs):
            got = dict(pair for out in outs for pair in out)
            hits = sum(got[i] == it["answer"].strip() for i, it in enumerate(task.items))
            return [("exact_match", hits / len(task.items), len(task.items))]

        return _batches(order, B), run_gen, finish_em


# ----------------------------------------------------------------------------- runs and budgets


@dataclasses.dataclass(frozen=True)
class RunSpec:
    policy: str
    budget: str  # "none", a size ("64MB"), or "+P%": the lo-bit minimum plus P% of experts as slots
    lo_bits: int

    def label(self, bits: int) -> str:
        """`bits`: the width the built engine uses (static may pick a wider one than lo_bits)."""
        budget = "" if self.budget == "none" else self.budget
        if budget.startswith("+"):
            budget = f"int{self.lo_bits}{budget}"
        at = f" @{budget}" if budget else ""
        if self.policy in ("static", "dynaexq"):
            return f"{self.policy} int{bits}{at}"
        return self.policy + at


def resolve_budget(spec: str, ckpt, opts: policies.DynaExqOptions, *, batch: int, longest: int, max_new_tokens: int) -> int | None:
    """Bytes for a budget spec; "+P%" uses the same memory plan as `policies.build_engine`."""
    if spec == "none":
        return None
    if not spec.startswith("+"):
        return budget_lib.parse_size(spec)
    try:
        pct = float(spec[1:].rstrip("%"))
    except ValueError:
        pct = -1.0
    if not spec.endswith("%") or not 0 <= pct <= 100:
        raise UserError(f"budget {spec!r}: a relative budget is '+P%' with 0 <= P <= 100, e.g. +25%")
    cfg = ckpt.config
    prompt = engine_lib.prompt_bucket(longest)
    plan = budget_lib.plan_memory(
        cfg, budget=None, batch=batch, prompt=prompt, context=engine_lib.cache_bucket(prompt + max_new_tokens),
        dtype_itemsize=ckpt.dtype.itemsize, lo_bits=opts.lo_bits, hi_dtype=opts.hi_dtype,
        group_size=budget_lib.expert_group_size(cfg, opts.group_size), xla_dequant=jax.default_backend() != "gpu",
    )
    slots = math.ceil(pct / 100 * plan.num_experts_total)
    return plan.minimum + slots * (plan.slot_bytes + plan.slot_workspace)


def expand_runs(policy_names: Sequence[str], budgets: Sequence[str], lo_bits: Sequence[int]) -> list[RunSpec]:
    """The cross product, less what would repeat: `full` runs once (it has no budget or
    bit width to vary), and a budget-less dynaexq run (every expert in a slot, i.e. full
    precision) is dropped when `full` is also asked for."""
    for p in policy_names:
        if p not in policies.POLICIES:
            raise UserError(f"unknown policy {p!r}; choose from {', '.join(policies.POLICIES)}")
    runs = []
    for p in policy_names:
        if p == "full":
            runs.append(RunSpec("full", "none", lo_bits[0]))
            continue
        for bits in lo_bits:
            for b in budgets:
                if p == "dynaexq" and b == "none" and "full" in policy_names:
                    continue
                runs.append(RunSpec(p, b, bits))
    return runs


def evaluate_runs(
    ckpt,
    runs: Sequence[RunSpec],
    tasks: Sequence[Task],
    *,
    opts: policies.DynaExqOptions = policies.DynaExqOptions(),
    hotness_profile: str | None = None,
    batch_size: int = 16,
    window: int = 256,
    max_length: int = 512,
    max_new_tokens: int = 32,
    residency: str = "pass",
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> list[Result]:
    """Evaluate every run on every task; one engine per run, built and dropped in turn."""
    longest = max([window, max_length] if any(t.kind != "ppl" for t in tasks) else [window])
    results = []
    for spec in runs:
        run_opts = dataclasses.replace(opts, lo_bits=spec.lo_bits)
        budget = resolve_budget(spec.budget, ckpt, run_opts, batch=batch_size, longest=longest, max_new_tokens=max_new_tokens)
        engine, plan = policies.build_engine(
            ckpt, spec.policy, budget=budget, batch=batch_size, longest_prompt=longest, max_new_tokens=max_new_tokens,
            opts=run_opts, hotness_profile=hotness_profile if spec.policy == "dynaexq" else None,
        )
        runtime = getattr(engine, "runtime", None)
        # The width experts are computed at: static's pick, dynaexq's fallback, else all high precision.
        bits = {"static": getattr(runtime, "lo_bits", None), "dynaexq": spec.lo_bits}.get(spec.policy, 16)
        label = spec.label(bits)
        log(f"{label}: budget {budget_lib.format_size(budget) if budget else 'none'}, accounted "
            f"{budget_lib.format_size(plan.total)}, {plan.slots if spec.policy != 'static' else 0} slots")
        ev = Evaluator(engine, batch_size=batch_size, window=window, max_length=max_length,
                       max_new_tokens=max_new_tokens, residency=residency, progress=progress, label=label)
        for task, metric, value, n in ev.run(tasks):
            results.append(Result(spec.policy, budget, task, metric, value, n, label, bits))
    return results


def table(results: Sequence[Result]) -> str:
    """Markdown: one row per run, one column per (task, metric)."""
    cols = list(dict.fromkeys((r.task, r.metric) for r in results))
    runs = list(dict.fromkeys((r.run, r.budget_bytes) for r in results))
    cell = {(r.run, r.task, r.metric): r.value for r in results}
    head = ["run", "budget"] + [f"{t} {m}" for t, m in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, b in runs:
        vals = [cell.get((run, t, m)) for t, m in cols]
        vals = ["" if v is None else (f"{v:.3f}" if m == "ppl" else f"{v:.4f}") for v, (_, m) in zip(vals, cols)]
        lines.append("| " + " | ".join([run, budget_lib.format_size(b) if b else "none"] + vals) + " |")
    return "\n".join(lines)
