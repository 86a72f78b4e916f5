"""Accuracy evaluation of any residency policy: perplexity, multiple choice, exact match.

Every task runs as batched calls of the engine's own jitted scorer (`Engine.score`: the
log-softmax and the gather of each next token's log-probability happen on the device, so only
[B, T] floats come back) or of its `generate`, over left-padded power-of-two buckets.

Batch independence. A sequence's scores must not depend on what shares its batch: padded
positions are masked out of attention and out of the routing statistics, every row is scored
on its own and padded to its task's length, and a dynaexq policy's residency never changes in
the middle of a pass (see `Residency`), so results are identical for any batch size.

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
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from dynaexq_jax import budget as budget_lib
from dynaexq_jax import inputs
from dynaexq_jax.errors import UserError
from dynaexq_jax.eval import big_little as bl_eval
from dynaexq_jax.eval.big_little import Sweep
from dynaexq_jax.io import store
from dynaexq_jax.models.big_little import BigLittle
from dynaexq_jax.policies import POLICIES, autotier
from dynaexq_jax.policies import floe as floe_lib
from dynaexq_jax.policies.dynaexq import DynaExqOptions, DynaExqPolicy
from dynaexq_jax.policies.floe import FloeOptions
from dynaexq_jax.policies.hotness import HotnessTracker
from dynaexq_jax.runtime import engine as engine_lib
from dynaexq_jax.runtime import mesh as mesh_lib
from dynaexq_jax.runtime.build import auto_tiers, build_engine, plan_for
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


def _read_jsonl(path: Path, text: str) -> list[dict]:
    items = []
    for i, line in enumerate(text.splitlines(), 1):
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
        raise TaskError(f"{path}:{i} needs a {kind.__name__} field {key!r}; "
                        "see the task formats in dynaexq_jax/eval/evaluate.py")
    return obj[key]


def load_task(kind: str, path: str | Path, *, what: str = "task file", fix: str = "check the path") -> Task:
    """Read and check a task file of `kind` ("ppl", "mc" or "em"): UTF-8 text, JSONL (a text file
    for perplexity). `what` names it in errors (e.g. the flag that gave it), `fix` ends a refusal
    of a file that cannot be read."""
    path = Path(path)
    if kind not in TASK_KINDS:
        raise TaskError(f"unknown task kind {kind!r}; choose one of {', '.join(TASK_KINDS)}")
    text = inputs.read_text(path, fix, what, TaskError)
    if kind == "ppl":
        if path.suffix == ".jsonl":
            docs = [_need(path, i, o, "text", str) for i, o in enumerate(_read_jsonl(path, text), 1)]
        else:
            docs = [text]
        items = [d for d in docs if d]
    else:
        items = _read_jsonl(path, text)
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


# ----------------------------------------------------------------------------- residency


class Residency:
    """Drives a dynaexq policy through an evaluation, deterministically.

    While an evaluation runs the engine computes with this stand-in for the policy: the same
    experts, but the routing it reports (every generation step) and the routing of every
    scored batch are only summed, so no swap starts or lands mid-pass. At a settle point the
    sum goes to the policy's `observe` (hotness, then a rebalance) and every swap it queues is
    landed before the next batch:
      pass    after each task pass (batch-size independent; the default)
      batch   after each batch (closer to serving, but depends on the batch size)
      frozen  never: the warm-start residency throughout
    Other policies are left to the engine.
    """

    name = "dynaexq"
    layerwise = False
    observe_every = 1  # every generation step, so a generation's routing is summed whole

    def __init__(self, engine, mode: str):
        if mode not in RESIDENCY_MODES:
            raise UserError(f"unknown residency mode {mode!r}; choose one of {', '.join(RESIDENCY_MODES)}")
        self.engine = engine
        self.mode = mode
        self.policy = engine.policy
        # One device's DynaExqPolicy, or a mesh of them (a budget-less dynaexq is a FixedPolicy).
        self.managed = all(isinstance(p, DynaExqPolicy) for p in getattr(self.policy, "parts", [self.policy]))
        self.mass = 0.0  # [moe_layers, E] router mass since the last settle
        self.tokens = 0
        self.pairs = 0  # routed pairs this pass, and how many a high-precision slot served
        self.hi_pairs = 0
        if self.managed:
            engine.policy = self

    # the policy interface the engine calls
    @property
    def experts(self):
        return self.policy.experts

    def prepare(self, routing_pass) -> None:
        self.policy.prepare(routing_pass)

    def between_steps(self) -> None:
        pass

    def observe(self, mass: np.ndarray, tokens: int, steps: float) -> None:
        """A generation's routing so far (its `steps` are not needed: see `_settle`)."""
        self._sum(mass, tokens)

    def after_request(self) -> None:
        pass  # no profile saved: what an evaluation learns comes from its own test data

    def stats(self) -> dict:
        return self.policy.stats()

    # called by the evaluation loop
    def scored(self, stats) -> None:
        """A scored batch's `RoutingStats` (None from a layerwise engine, never managed)."""
        if self.managed:
            self._sum(stats.mass, int(stats.tokens))
            self.pairs += int(stats.counts.sum())
            self.hi_pairs += int(stats.hi_pairs)

    def generated(self, gen) -> None:
        """A generation's pairs (its routing came through `observe`)."""
        if self.managed:
            pairs = int(gen.expert_counts.sum())
            self.pairs += pairs
            self.hi_pairs += round(gen.stats["hi_hit_rate"] * pairs) if pairs else 0

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
        self.mass, self.tokens, self.pairs, self.hi_pairs = 0.0, 0, 0, 0
        return share

    def close(self) -> None:
        if self.managed:
            self.engine.policy = self.policy

    def _sum(self, mass: np.ndarray, tokens: int) -> None:
        """Routing to observe at the next settle point."""
        self.mass = self.mass + np.asarray(mass, np.float64)
        self.tokens += int(tokens)

    def _settle(self) -> None:
        if self.mode == "frozen" or not self.tokens:
            return
        # One step per token, as if every sequence were served alone: the hotness horizon then
        # does not depend on how the sequences were batched.
        self.policy.observe(self.mass, self.tokens, self.tokens)
        self.mass, self.tokens = 0.0, 0
        self.policy.settle()


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
    return _windows(stream, window)


def _windows(stream: list[int], window: int) -> list[list[int]]:
    step = window - 1
    return [stream[i : i + window] for i in range(0, max(len(stream) - 1, 1), step) if len(stream[i : i + window]) > 1]


def calibration_sequences(tok, docs: Sequence[str], eos_ids: Sequence[int], window: int) -> list[list[int]]:
    """Calibration text as windows of `window` tokens: the documents joined by EOS, as perplexity
    text is (`ppl_sequences`), or, for a checkpoint that names no eos_token_id, document by
    document (no window crosses from one into the next)."""
    if eos_ids:
        return ppl_sequences(tok, docs, eos_ids[0], window)
    return [w for enc in tok.encode_batch(list(docs), add_special_tokens=False) for w in _windows(enc.ids, window)]


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


class _Pass(NamedTuple):
    """How one task is run: its sequences (or prompts), the order they are batched in, what a
    batch of indices yields, and the metrics from every batch's output."""

    seqs: list[list[int]]
    order: list[int]
    run: Callable[[list[int]], object]
    finish: Callable[[list], list[tuple[str, float, int]]]


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
        self._little = np.zeros(2, np.int64)  # big-little: token-layers computed little, all token-layers

    def run(self, tasks: Sequence[Task]) -> list[tuple[str, str, float, int]]:
        """-> [(task, metric, value, n)]; a dynaexq run adds each task's `hi_pair_share`."""
        res = Residency(self.engine, self.residency)
        rows = []
        try:
            passes = [(t, self._pass(t, res)) for t in tasks]
            total = sum(-(-len(p.order) // self.batch_size) for _, p in passes)
            with tqdm(total=total, desc=self.label or "eval", file=sys.stderr, disable=not self.progress,
                      dynamic_ncols=True, leave=False) as bar:
                for task, p in passes:
                    outputs = []
                    for idx in _batches(p.order, self.batch_size):
                        outputs.append(p.run(idx))
                        res.after_batch()
                        bar.update(1)
                    rows += [(task.name, m, v, n) for m, v, n in p.finish(outputs)]
                    if self.engine.big_little is not None and self._little[1]:
                        rows.append((task.name, "little_share", self._little[0] / self._little[1], 0))
                    self._little[:] = 0
                    share = res.after_pass()
                    if share is not None:
                        rows.append((task.name, "hi_pair_share", share, 0))
        finally:
            res.close()
        return rows

    def _score(self, seqs: list[list[int]], idx: list[int], length: int, res: Residency) -> list[np.ndarray]:
        """Next-token log-probabilities of `seqs[i]` for i in `idx`, padded to `length`: the
        task's own, so a sequence's padding (hence its rounding) never depends on which others
        share its batch."""
        lps, stats = self.engine.score([seqs[i] for i in idx], length)
        res.scored(stats)
        if stats is not None and self.engine.big_little is not None:  # the layerwise engine reports none
            self._little += (int(stats.little_marked) - int(stats.fallbacks),
                             int(stats.tokens) * len(self.engine.cfg.moe_layers))
        return lps

    def _pass(self, task: Task, res: Residency) -> _Pass:
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

            return _Pass(seqs, list(range(len(seqs))), lambda idx: self._score(seqs, idx, P, res), finish)

        if task.kind == "mc":
            seqs, n_cont = mc_sequences(self.tok, task.items, self.max_length)
            P = engine_lib.prompt_bucket(max(map(len, seqs)))

            def run_batch(idx):
                lps = self._score(seqs, idx, P, res)
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

            return _Pass(seqs, _by_length([len(s) for s in seqs]), run_batch, finish)

        # Prompts are left-truncated like multiple-choice contexts: the engine is sized for max_length.
        prompts = [self.tok.encode(it["prompt"], add_special_tokens=False).ids[-self.max_length :] for it in task.items]
        if any(not p for p in prompts):
            raise TaskError(f"task {task.name}: every prompt must encode to at least one token")

        def run_gen(idx):
            gen = self.engine.generate([prompts[i] for i in idx], self.max_new_tokens, SamplingParams())
            res.generated(gen)
            if "big_little" in gen.stats:
                self._little += (gen.stats["big_little"]["little_token_layers"],
                                 gen.stats["big_little"]["tokens"] * len(self.engine.cfg.moe_layers))
            texts = self.tok.decode_batch(gen.tokens, skip_special_tokens=True)
            return [(i, first_line(t)) for i, t in zip(idx, texts)]

        def finish_em(outs):
            got = dict(pair for out in outs for pair in out)
            hits = sum(got[i] == it["answer"].strip() for i, it in enumerate(task.items))
            return [("exact_match", hits / len(task.items), len(task.items))]

        return _Pass(prompts, _by_length([len(p) for p in prompts]), run_gen, finish_em)


# ----------------------------------------------------------------------------- runs and budgets


@dataclasses.dataclass(frozen=True)
class RunSpec:
    policy: str
    budget: str  # "none", a size ("64MB"), or "+P%": the lo-bit minimum plus P% of experts as slots
    lo_bits: int  # static without a budget and fixed-tier dynaexq: the width; auto dynaexq: the +P% anchor
    tiers: str = "fixed"  # dynaexq: "auto" (the plan picks the tiers within the budget) or "fixed"

    def label(self, bits: int, hi_dtype: str | None = None, mid: str = "") -> str:
        """`bits`: the width the built engine uses (static may pick a wider one than lo_bits);
        `hi_dtype`: dynaexq's slot dtype; `mid`: its experts at a wider fallback width."""
        budget = "" if self.budget == "none" else self.budget
        if budget.startswith("+"):
            budget = f"int{self.lo_bits}{budget}"
        at = f" @{budget}" if budget else ""
        if self.policy == "dynaexq":
            hi = {"bfloat16": "bf16", "float32": "f32"}.get(hi_dtype, hi_dtype)
            return f"dynaexq {self.tiers} int{bits}{mid}" + (f"+{hi}" if hi else "") + at
        if self.policy == "static":
            return f"static int{bits}{at}"
        return self.policy + at


TIER_MODES = ("auto", "fixed")


def run_options(spec: RunSpec, opts: DynaExqOptions) -> DynaExqOptions:
    """The options `spec` builds its engine with: auto dynaexq leaves the tiers (fallback width,
    mixed fallback, slots, and an "auto" slot dtype) to the plan; every other run is fixed at the
    spec's width, in bf16 slots unless a slot dtype was given."""
    hi = "bfloat16" if opts.hi_dtype == "auto" else opts.hi_dtype
    if spec.policy == "dynaexq" and spec.tiers == "auto":
        return dataclasses.replace(opts, lo_bits="auto")
    return dataclasses.replace(opts, lo_bits=spec.lo_bits, hi_dtype=hi)


def budget_spec(spec: str) -> int | float | None:
    """A budget spec checked: None ("none"), bytes (a size) or, for "+P%", P as a float."""
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
    return pct


def resolve_budget(spec: str, ckpt, opts: DynaExqOptions, *, batch: int, longest: int, max_new_tokens: int,
                   devices: int = 1) -> int | None:
    """Bytes for a budget spec; "+P%" uses the memory plan `build_engine` makes for dynaexq at
    `opts.lo_bits` with bf16 slots (or the slot dtype given), one device's on a mesh of `devices`."""
    pct = budget_spec(spec)
    if not isinstance(pct, float):
        return pct
    anchor = dataclasses.replace(opts, hi_dtype="bfloat16" if opts.hi_dtype == "auto" else opts.hi_dtype)
    plan = plan_for(ckpt.config, "dynaexq", budget=None, batch=batch, longest_prompt=longest,
                    max_new_tokens=max_new_tokens, dtype_itemsize=ckpt.dtype.itemsize, opts=anchor, devices=devices)
    return plan.budget_for(math.ceil(pct / 100 * plan.num_experts_total))


def expand_runs(policy_names: Sequence[str], budgets: Sequence[str], lo_bits: Sequence[int],
                tiers: Sequence[str] = ("auto",)) -> list[RunSpec]:
    """The cross product, less what would repeat: `full` runs once (it has no budget or
    bit width to vary), a budget-less dynaexq run (every expert in a slot, i.e. full
    precision) is dropped when `full` is also asked for, and dynaexq runs once per tier mode."""
    for p in policy_names:
        if p not in POLICIES:
            raise UserError(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
    for t in tiers:
        if t not in TIER_MODES:
            raise UserError(f"unknown tier mode {t!r}; choose from {', '.join(TIER_MODES)}")
    runs = []
    for p in policy_names:
        if p == "full":
            runs.append(RunSpec("full", "none", lo_bits[0]))
            continue
        for bits in lo_bits:
            for b in budgets:
                if p == "dynaexq" and b == "none" and "full" in policy_names:
                    continue
                runs += [RunSpec(p, b, bits, t) for t in tiers] if p == "dynaexq" else [RunSpec(p, b, bits)]
    return runs


def calibration_profile(ckpt, docs: Sequence[str], *, window: int, batch_size: int,
                        half_life_steps: float) -> HotnessTracker:
    """Router mass per token of every expert over `docs` (cut into windows as perplexity text
    is), routed through the full model, as build_tasks.py records the shipped profile."""
    seqs = calibration_sequences(ckpt.tokenizer, docs, ckpt.eos_token_ids, window)
    if not seqs:
        raise UserError("the calibration text holds no tokens; pass a JSONL of {\"text\"} or a text file")
    engine, _ = build_engine(ckpt, "full", budget=None, batch=batch_size, longest_prompt=window, max_new_tokens=1)
    length = engine_lib.prompt_bucket(max(map(len, seqs)))
    mass, tokens = 0.0, 0
    for idx in _batches(list(range(len(seqs))), batch_size):
        _, stats = engine.score([seqs[i] for i in idx], length)
        mass = mass + np.asarray(stats.mass, np.float64)
        tokens += int(stats.tokens)
    L, E = mass.shape
    return HotnessTracker(L, E, half_life_steps, mass / max(tokens, 1))


def warm_profile(ckpt, opts: DynaExqOptions, hotness_profile=None, calibration: Sequence[str] | None = None, *,
                 default_profile: str | None = None, window: int = 256, batch_size: int = 16,
                 log: Callable[[str], None] = lambda s: None) -> HotnessTracker:
    """Where dynaexq's residency starts in an evaluation, never from nothing: the profile given,
    (a path, or a `HotnessTracker`), else the one saved for this checkpoint, else one computed
    on `calibration` text (and saved for the checkpoint, so it is computed once), else
    `default_profile` (e.g. the one a checkpoint ships)."""
    L, E = len(ckpt.config.moe_layers), ckpt.config.num_experts
    if isinstance(hotness_profile, HotnessTracker):
        return hotness_profile
    if hotness_profile:
        return HotnessTracker.load(hotness_profile, opts.half_life_steps, expect_shape=(L, E))
    saved = store.profile_path(ckpt.source)
    if saved is not None and saved.is_file():
        try:
            tracker = HotnessTracker.load(saved, opts.half_life_steps, expect_shape=(L, E))
            log(f"warm start: the profile saved for this checkpoint ({saved})")
            return tracker
        except ValueError as e:
            warnings.warn(f"ignoring the saved hotness profile ({e})")
    if not calibration and default_profile:
        log(f"warm start: {default_profile}")
        return HotnessTracker.load(default_profile, opts.half_life_steps, expect_shape=(L, E))
    if not calibration:
        raise UserError("dynaexq needs a warm-start profile: pass --hotness PROFILE or --calibration TEXT "
                        "(training-like text, never the evaluation data)")
    tracker = calibration_profile(ckpt, calibration, window=window, batch_size=batch_size,
                                  half_life_steps=opts.half_life_steps)
    log(f"warm start: a profile computed on {len(calibration)} calibration documents")
    if saved is not None:
        try:
            saved.parent.mkdir(parents=True, exist_ok=True)
            tracker.save(saved)
        except OSError as e:  # a read-only cache must not fail the evaluation
            warnings.warn(f"could not save the calibration profile to {saved} ({e})")
    return tracker


def evaluate_runs(
    ckpt,
    runs: Sequence[RunSpec],
    tasks: Sequence[Task],
    *,
    opts: DynaExqOptions = DynaExqOptions(),
    hotness_profile: str | None = None,
    calibration: Sequence[str] | None = None,
    default_profile: str | None = None,
    batch_size: int = 16,
    window: int = 256,
    max_length: int = 512,
    max_new_tokens: int = 32,
    residency: str = "pass",
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
    sweep: Sweep | None = None,
    floe: FloeOptions = FloeOptions(),
    mesh=None,
) -> list[Result]:
    """Evaluate every run on every task; one engine per run, built and dropped in turn.
    Dynaexq runs start warm from `warm_profile` (`hotness_profile`, the checkpoint's saved
    profile, `calibration` text, or `default_profile`). With a big-little `sweep`, each run is evaluated again at
    each target little share > 0 (rows labelled "<run> little <share>"), thresholds calibrated
    once on the first perplexity task. `mesh` (`runtime.mesh.expert_mesh`): every run spread
    over its devices, budgets per device, dynaexq on fixed tiers (as `build_engine` on a mesh)."""
    devices = 1 if mesh is None else mesh.size
    if mesh is not None:
        for spec in runs:
            mesh_lib.check_policy(spec.policy)
        runs = list(dict.fromkeys(dataclasses.replace(spec, tiers="fixed") for spec in runs))
    longest = max([window, max_length] if any(t.kind != "ppl" for t in tasks) else [window])
    shape = dict(batch=batch_size, longest=longest, max_new_tokens=max_new_tokens)
    plan_kw = dict(batch=batch_size, longest_prompt=longest, max_new_tokens=max_new_tokens)
    budgets = []
    for spec in runs:  # every run's budget, before the first run starts: a late refusal wastes the earlier runs
        anchor = dataclasses.replace(opts, lo_bits=spec.lo_bits)
        # auto tiers fit wherever the narrowest fallback does
        check = dataclasses.replace(run_options(spec, opts), lo_bits=min(autotier.LO_WIDTHS), hi_dtype="bfloat16") \
            if spec.policy == "dynaexq" and spec.tiers == "auto" else run_options(spec, opts)
        try:
            budgets.append(resolve_budget(spec.budget, ckpt, anchor, devices=devices, **shape))
            plan_for(ckpt.config, spec.policy, budget=budgets[-1], dtype_itemsize=ckpt.dtype.itemsize, opts=check,
                     floe=floe, devices=devices, **plan_kw)
        except UserError as e:
            raise UserError(f"run {spec.label(spec.lo_bits)}: {e}") from None
    if any(spec.policy == "floe" for spec in runs) and floe.sparsity > 0 and floe.thresholds is None:
        # A missing or mismatched calibration fails now, not after the runs before floe's.
        floe = dataclasses.replace(floe, group_size=budget_lib.floe_up_group(ckpt.config, floe.group_size))
        floe = dataclasses.replace(floe, thresholds=floe_lib.calibrated_thresholds(ckpt, floe))
    levels = _sweep_levels(ckpt, sweep, tasks, window) if sweep else {}
    profile = None
    if any(spec.policy == "dynaexq" for spec in runs):
        profile = warm_profile(ckpt, opts, hotness_profile, calibration, default_profile=default_profile,
                               window=window, batch_size=batch_size, log=log)
    results = []
    for spec, budget in zip(runs, budgets):
        # No saved profile: a run must not depend on what earlier runs of the checkpoint learned.
        run_opts = dataclasses.replace(run_options(spec, opts), save_profile=False)
        hi, choice = None, None
        if spec.policy == "dynaexq":
            run_opts, choice = auto_tiers(ckpt, run_opts, budget=budget, hotness_profile=profile, **plan_kw)
            if choice is not None:
                log(f"{spec.label(spec.lo_bits)}: {choice.describe()}")
        # The plain run, then one per big-little level, each on a fresh engine (residency included).
        for share, bl in [(None, None)] + list(levels.items()):
            engine, plan = build_engine(ckpt, spec.policy, budget=budget, opts=run_opts,
                                        hotness_profile=profile if spec.policy == "dynaexq" else None,
                                        big_little=bl, floe=floe, mesh=mesh, **plan_kw)
            # The width experts are computed at: static's pick, dynaexq's fallback, else all high precision.
            bits = {"static": getattr(engine.policy, "lo_bits", None), "dynaexq": run_opts.lo_bits,
                    "floe": floe.up_bits or 16}.get(spec.policy, 16)
            if spec.policy == "dynaexq" and plan.slots:
                hi = run_opts.hi_dtype
            mid = f"/{len(run_opts.mid_experts)}xint{run_opts.mid_bits}" if run_opts.mid_experts else ""
            label = spec.label(bits, hi, mid) + ("" if bl is None else f" little {share:.0%}")
            if spec.policy == "floe":  # the up projections' width and the channels dropped
                up = budget_lib.format_name(floe.up_bits) if floe.up_bits else "uncompressed"
                label = label.replace("floe", f"floe up {up} sparsity {floe.sparsity}", 1)
            log(f"{label}: budget {budget_lib.format_size(budget) if budget else 'none'}, accounted "
                f"{budget_lib.format_size(plan.total)}, {plan.slots if spec.policy != 'static' else 0} slots"
                + ("" if bl is None else f", {bl}"))
            ev = Evaluator(engine, batch_size=batch_size, window=window, max_length=max_length,
                           max_new_tokens=max_new_tokens, residency=residency, progress=progress, label=label)
            for task, metric, value, n in ev.run(tasks):
                results.append(Result(spec.policy, budget, task, metric, value, n, label, bits))
            del engine
    return results


def _sweep_levels(ckpt, sweep: Sweep, tasks: Sequence[Task], window: int) -> dict[float, BigLittle]:
    """{target share > 0: its BigLittle}, thresholds from the plain full model on (at most 8
    windows of) the first perplexity task."""
    ppl = next((t for t in tasks if t.kind == "ppl"), None)
    if ppl is None:
        raise UserError("a big-little sweep calibrates its thresholds on a perplexity task; add --ppl")
    if not ckpt.eos_token_ids or ckpt.tokenizer is None:
        raise UserError("a big-little sweep needs the checkpoint's tokenizer and eos_token_id to calibrate")
    seqs = ppl_sequences(ckpt.tokenizer, ppl.items, ckpt.eos_token_ids[0], window)[:8]
    little_k = sweep.little_k or max(1, ckpt.config.experts_per_token // 2)
    cut = bl_eval.thresholds(engine_lib.Engine(ckpt), seqs, little_k, sweep.rule, sweep.shares)
    return {s: BigLittle(little_k, sweep.rule, t, sweep.floor) for s, t in cut.items() if s > 0}


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
