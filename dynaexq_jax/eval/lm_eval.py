"""lm-evaluation-harness on the engine: lm-eval's `--model dynaexq`.

    python scripts/lm_eval.py --model dynaexq \\
        --model_args pretrained=checkpoints/tiny-qwen3-moe,policy=dynaexq,budget=20GB,dtype=bfloat16 \\
        --tasks TASKS [--include_path DIR] [--batch_size N] [--output_path DIR]

Model arguments: `pretrained` (a checkpoint directory), `policy` (one of `POLICIES`, default
dynaexq), `budget` (a size, as `--budget` takes it; default none), `dtype` (bfloat16 or
float32), `lo_bits`, `hi_dtype`, `group_size`, `quant_method`, `hotness` (a profile to warm
dynaexq from), `residency` (pass, batch or frozen: see `evaluate.Residency`; a pass is one call
of lm-eval's, i.e. one request type), `max_length` (default: the model's context),
`max_gen_toks` (default 256) and `prefix_token_id`.

It follows lm-eval's own `--model hf` (`HFLM`) step by step, so that on one checkpoint, in
float32 with `policy=full`, the two give the same numbers:
- text is encoded as HF's tokenizer encodes it (tokenizer.json with its post-processor), but
  without special tokens for a string that already starts with the prefix token;
- the prefix token (the tokenizer's BOS token, else its EOS token, or `prefix_token_id`)
  conditions an empty context and the first rolling window; lm-eval's target delimiters and
  context/continuation split (trailing spaces of a context go to its continuation) apply as
  its `TemplateLM` does them;
- a context + continuation over `max_length` + 1 tokens is cut on the left; a document for
  `loglikelihood_rolling` is cut into lm-eval's disjoint windows of `max_length` tokens;
- `generate_until` cuts contexts on the left to `max_length - max_gen_toks` tokens, generates
  (greedily unless `do_sample`) up to `max_gen_toks` tokens, stops at the model's EOS and cuts
  the text at the first stop string;
- requests run longest first in batches of `--batch_size`, as lm-eval's `Collator` orders them
  (each scored on its own: HFLM's sharing of one forward among one-token continuations of a
  context saves time and changes no number).

Scoring is one jitted forward of the engine's model per batch, over the engine's buckets
(power-of-two lengths and rows, compiled once each with its compiler options), that returns
only each target token's log-probability and whether it is the argmax (lm-eval's `is_greedy`,
which `Engine.score` does not give); offload/prefetch score through `LayerwiseEngine.logits`.
Generation is `engine.generate`, with stop strings applied to the decoded text.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from dynaexq_jax import budget as budget_lib
from dynaexq_jax import inputs
from dynaexq_jax.errors import UserError
from dynaexq_jax.eval.evaluate import Residency
from dynaexq_jax.io import chat, loader
from dynaexq_jax.models.decoder import KVCache
from dynaexq_jax.policies.dynaexq import DynaExqOptions
from dynaexq_jax.runtime.build import build_engine
from dynaexq_jax.runtime.engine import (
    Engine,
    RoutingStats,
    batch_bucket,
    compiler_options,
    left_pad,
    prompt_bucket,
)
from dynaexq_jax.runtime.sampling import SamplingParams

DEFAULT_MAX_GEN_TOKS = 256  # HFLM's
SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p")


def _score_targets(decoder, params, experts, cache, tokens, positions, valid, targets):
    """Each position's log p(target) [B, T] and whether the target is the argmax [B, T] (inputs
    and targets left-padded alike), and the routing statistics of the real tokens."""
    logits, _, routing = decoder(params, experts, cache, tokens, positions, valid, fresh=True)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    stats = RoutingStats.zeros(routing.chosen.shape[0], routing.chosen.shape[-1])
    return picked, greedy, stats.add(routing, valid, experts)


class _Scorer:
    """`_score_targets` on an `Engine`, over the engine's bucketed shapes, compiled per bucket."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.fn = jax.jit(functools.partial(_score_targets, engine.decoder))
        self.compiled = {}

    def __call__(self, seqs: list[list[int]]):
        """-> ([(log p [n-1], is argmax [n-1]) of each sequence's tokens 1..], host `RoutingStats`)."""
        inputs = [s[:-1] for s in seqs]
        P, B = prompt_bucket(max(map(len, inputs))), batch_bucket(len(seqs))
        host = left_pad(inputs, P, B) + (left_pad([s[1:] for s in seqs], P, B)[0],)
        self.engine.policy.prepare(lambda: self._routing(self._run(host)))
        logp, greedy, stats = jax.device_get(self._run(host))
        return [(logp[b, P - len(x):], greedy[b, P - len(x):]) for b, x in enumerate(inputs)], stats

    def _run(self, host):
        eng = self.engine
        B, P = host[0].shape
        args = (eng.params, eng.policy.experts, KVCache.empty(eng.cfg, B, P, eng.checkpoint.dtype),
                *(jax.device_put(a) for a in host))
        if (B, P) not in self.compiled:
            self.compiled[B, P] = self.fn.lower(*args).compile(compiler_options())
        return self.compiled[B, P](*args)

    @staticmethod
    def _routing(scored):
        _, _, stats = jax.device_get(scored)
        return np.asarray(stats.mass, np.float64), int(stats.tokens), scored[0].shape[1]


def _layerwise_scores(engine, seqs: list[list[int]]):
    """As `_Scorer`, for a `LayerwiseEngine`: its logits come to the host whole."""
    out = []
    for x, logits in zip(seqs, engine.logits([s[:-1] for s in seqs])):
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        targets = np.asarray(x[1:])
        out.append((logp[np.arange(len(targets)), targets], logits.argmax(axis=-1) == targets))
    return out, None


def _special_token(path: Path, name: str) -> str | None:
    """`bos_token` / `eos_token` of tokenizer_config.json (text, or a serialized AddedToken)."""
    config_file = path / "tokenizer_config.json"
    doc = inputs.read_json(config_file, "restore it from the model's release") if config_file.is_file() else {}
    value = doc.get(name) if isinstance(doc, dict) else None
    return value.get("content") if isinstance(value, dict) else value


def _batch_size(value) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise UserError(f"--batch_size {value!r}: the dynaexq model takes a whole number >= 1 (no 'auto')")
    return size


@register_model("dynaexq")
class DynaExqLM(TemplateLM):
    """lm-eval's model interface on a dynaexq-jax engine (see the module docstring)."""

    def __init__(self, pretrained: str, policy: str = "dynaexq", budget=None, dtype: str = "bfloat16",
                 lo_bits: int = 4, hi_dtype: str = "bfloat16", group_size: int = 128, quant_method: str = "rtn",
                 hotness: str | None = None, residency: str = "pass", max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, prefix_token_id: int | None = None, batch_size=1,
                 max_batch_size=None, device=None):
        # max_batch_size (for 'auto') and device (JAX's default device is used) come from lm-eval's
        # command line for every model; neither applies here.
        super().__init__()
        if dtype not in ("bfloat16", "float32"):
            raise UserError(f"dtype={dtype!r}: choose bfloat16 or float32")
        if residency not in ("pass", "batch", "frozen"):
            raise UserError(f"residency={residency!r}: choose pass, batch or frozen")
        self.path = Path(pretrained)
        self.ckpt = loader.load(self.path, jnp.dtype(dtype))
        self.tok = self.ckpt.tokenizer
        if self.tok is None:
            raise UserError(f"{self.path} has no tokenizer.json, so task text cannot be encoded")
        context = self.ckpt.config.max_position_embeddings
        self._max_length = int(max_length or context)
        if not 1 <= self._max_length <= context:
            raise UserError(f"max_length={max_length}: give 1 to the model's context of {context}")
        self._max_gen_toks = int(max_gen_toks)
        self._batch_size = _batch_size(batch_size)
        self.residency = residency
        opts = DynaExqOptions(lo_bits=int(lo_bits), hi_dtype=hi_dtype, group_size=int(group_size),
                              quant_method=quant_method, save_profile=False)  # scores never depend on past runs
        self.engine, self.plan = build_engine(
            self.ckpt, policy, budget=None if budget is None else budget_lib.parse_size(str(budget)),
            batch=self._batch_size, longest_prompt=self._max_length, max_new_tokens=self._max_gen_toks,
            opts=opts, hotness_profile=hotness,
        )
        self.scorer = _Scorer(self.engine) if isinstance(self.engine, Engine) else None
        self._bos = _special_token(self.path, "bos_token")
        eos = _special_token(self.path, "eos_token")
        self._eot = self.tok.token_to_id(eos) if eos else None
        if self._eot is None and not self.ckpt.eos_token_ids:
            raise UserError(f"{self.path} names no EOS token (tokenizer_config.json or config.json)")
        self._eot = self.ckpt.eos_token_ids[0] if self._eot is None else self._eot
        bos_id = self.tok.token_to_id(self._bos) if self._bos else None
        default_prefix = self._eot if bos_id is None else bos_id  # HFLM's: BOS, else EOS
        self._prefix = default_prefix if prefix_token_id is None else int(prefix_token_id)
        self._prefix_text = self.tok.decode([self._prefix], skip_special_tokens=False)

    # ------------------------------------------------------------------ lm-eval's properties
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.path.resolve()).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if add_special_tokens is None:  # as HFLM: no second prefix token before one the text has
            add_special_tokens = not string.startswith(self._prefix_text)
        ids = self.tok.encode(string, add_special_tokens=add_special_tokens).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        template = chat.load_chat_template(self.path)
        if template is None:
            raise UserError(f"{self.path} has no chat template; drop --apply_chat_template")
        return template.render(chat_history, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ scoring
    @contextlib.contextmanager
    def _pass(self):
        """One lm-eval call is one evaluation pass: a dynaexq policy's residency changes only at
        its end (or after each batch with residency=batch), never inside a batch."""
        res = Residency(self.engine, self.residency)
        try:
            yield res
            res.after_pass()
        finally:
            res.close()

    def _score(self, seqs: list[list[int]], res: Residency):
        scored, stats = self.scorer(seqs) if self.scorer else _layerwise_scores(self.engine, seqs)
        if stats is not None:
            res.scored(stats)
        res.after_batch()
        return scored

    def _warm(self, res: Residency, seq: list[int]) -> None:
        """As `Residency.warm`: dynaexq without a profile fills its slots from one fixed
        sequence's routing (the longest request's), whatever the batch size."""
        if res.managed and not res.policy.warm:
            self.scorer([seq])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids)."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        out = []
        with self._pass() as res, tqdm(total=len(requests), disable=disable_tqdm,
                                       desc="Running loglikelihood requests") as bar:
            for i, chunk in enumerate(order.get_batched(n=self.batch_size)):
                # HFLM's window: the last max_length inputs, each predicting the next token.
                seqs = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in chunk]
                if i == 0:
                    self._warm(res, seqs[0])
                for (key, _, cont), (logp, greedy) in zip(chunk, self._score(seqs, res)):
                    n = len(logp) - len(cont)  # the continuation's targets are the last ones
                    answer = (float(np.sum(logp[n:], dtype=np.float64)), bool(greedy[n:].all()))
                    out.append(answer)
                    if key is not None:  # rolling windows are cached per document instead
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                    bar.update(1)
        return order.get_original(out)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _sampling(self, kwargs: dict) -> SamplingParams:
        unknown = sorted(set(kwargs) - set(SAMPLING_KWARGS))
        if unknown:
            raise UserError(f"generation kwargs {unknown} are not supported by the dynaexq model; "
                            f"it takes until, max_gen_toks and {', '.join(SAMPLING_KWARGS)}")
        if not kwargs.get("do_sample"):
            return SamplingParams()
        return SamplingParams(float(kwargs.get("temperature", 1.0)), int(kwargs.get("top_k", 0)),
                              float(kwargs.get("top_p", 1.0)))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        order = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos = self.tok.decode([self.eot_token_id], skip_special_tokens=False)
        out = []
        with self._pass() as res, tqdm(total=len(requests), disable=disable_tqdm,
                                       desc="Running generate_until requests") as bar:
            for chunk in order.get_batched(n=self.batch_size):
                contexts, all_kwargs = zip(*chunk)
                kwargs = dict(normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks))
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen = kwargs.pop("max_gen_toks")
                if max_gen >= self.max_length:
                    raise UserError(f"max_gen_toks {max_gen} leaves no room for a context in max_length "
                                    f"{self.max_length}")
                # As HFLM's batch encoding: the first context decides whether special tokens are added.
                special = not (self._bos and contexts[0].startswith(self._bos))
                prompts = [self.tok.encode(c, add_special_tokens=special).ids[-(self.max_length - max_gen):]
                           for c in contexts]
                gen = self.engine.generate(prompts, max_gen, self._sampling(kwargs))
                res.generated(gen)
                for context, tokens in zip(contexts, gen.tokens):
                    text = postprocess_generated_text(self.tok.decode(tokens, skip_special_tokens=True), until, None)
                    out.append(text)
                    self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                    bar.update(1)
        return order.get_original(out)
