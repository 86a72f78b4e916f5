"""transformers' own model of a preset on this machine's device (torch: CUDA when there is one),
bf16 with every expert resident, timed as `generate` hands each token over: the peer every
decode figure of ours is set beside. Needs torch and transformers (the test extras; both on the
GPU image)."""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from dynaexq_jax.io.preset import PRESETS


def decode_speed(preset_name: str, *, prompt: int, gen: int, batches=(1, 32)) -> Iterator[dict]:
    """First {build_s, transformers, torch}, then per batch {batch, warmup_s,
    decode_tokens_per_s, step_s, peak_device_bytes}: greedy, `prompt` random tokens, `gen` new
    ones (the first token's time excluded from tok/s)."""
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fields = dict(PRESETS[preset_name])
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    yield dict(build_s=time.perf_counter() - t0, transformers=transformers.__version__, torch=torch.__version__)

    class Clock(transformers.generation.streamers.BaseStreamer):
        """The time each token reaches the host (generate hands it over once it is computed)."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    for batch in batches:
        ids = torch.as_tensor(np.random.default_rng(batch).integers(1, config.vocab_size, (batch, prompt)), device=dev)

        def run(n):
            clock = Clock()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, streamer=clock)
            return clock.times  # the prompt, then each new token

        t0 = time.perf_counter()
        run(2)
        warm_s = time.perf_counter() - t0
        times = run(gen)
        tok_s = batch * (len(times) - 2) / (times[-1] - times[1])  # the tokens after the first
        yield dict(batch=batch, warmup_s=warm_s, decode_tokens_per_s=tok_s, step_s=batch / tok_s,
                   peak_device_bytes=torch.cuda.max_memory_allocated() if dev == "cuda" else None)


__all__ = ["decode_speed"]
