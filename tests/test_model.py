"""The JAX model against transformers' own Qwen3-MoE on the same checkpoint (float32)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dynaexq_jax.io import loader
from dynaexq_jax.runtime import engine
from dynaexq_jax.runtime.sampling import SamplingParams

PROMPTS = [[5, 17, 42, 9, 100, 7, 250, 33, 12], [64, 3], [8, 8, 19, 200, 45]]


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    path, hf = hf_checkpoint
    return engine.Engine(loader.load(path, jnp.float32)), hf


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def test_last_position_logits_match_transformers(loaded):
    eng, hf = loaded
    ours = eng.logits(PROMPTS)
    for ids, lg in zip(PROMPTS, ours):
        ref = hf_logits(hf, ids)
        np.testing.assert_allclose(lg[-1], ref[-1], atol=1e-4, rtol=0)
        np.testing.assert_allclose(lg, ref, atol=1e-4, rtol=0)  # every position, despite left padding


def test_greedy_generation_matches_transformers_generate(loaded):
    eng, hf = loaded
    for ids in PROMPTS[:2]:
        ours = eng.generate([ids], max_new_tokens=24, eos_token_ids=()).tokens[0]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None)
        assert ours == ref[0, len(ids):].tolist()
        assert len(set(ours)) > 2, "degenerate reference: the test would not tell much"


def test_batched_left_padded_prompts_match_each_prompt_alone(loaded):
    eng, _ = loaded
    batch = eng.generate(PROMPTS, max_new_tokens=12, eos_token_ids=()).tokens
    alone = [eng.generate([p], max_new_tokens=12, eos_token_ids=()).tokens[0] for p in PROMPTS]
    assert batch == alone


def test_generation_stops_at_eos_and_keeps_it(loaded):
    eng, _ = loaded
    free = eng.generate([PROMPTS[0]], max_new_tokens=10, eos_token_ids=()).tokens[0]
    stop = free[3]
    cut = eng.generate([PROMPTS[0]], max_new_tokens=10, eos_token_ids=(stop,)).tokens[0]
    assert cut == free[: free.index(stop) + 1]


def test_steps_compile_once_per_bucket_and_sampling_mode(moe_checkpoint):
    eng = engine.Engine(loader.load(moe_checkpoint[0], jnp.float32))
    eng.generate([[1, 2, 3]], max_new_tokens=8)
    assert len(eng._compiled) == 2  # one prefill, one decode executable
    eng.generate([[4, 5, 6, 7, 8]], max_new_tokens=8)  # same prompt and cache buckets
    eng.generate([[9]], max_new_tokens=20, sampling=SamplingParams(temperature=0.8, top_k=5, seed=3))
    assert len(eng._compiled) == 4  # greedy is an argmax: sampling has its own pair
    eng.generate([[1, 2], [3, 4], [5, 6], [7, 8]], max_new_tokens=8)
    eng.generate([[1, 2], [3, 4], [5, 6]], max_new_tokens=8)  # 3 rows share the 4-row bucket
    assert len(eng._compiled) == 6


def test_sampling_is_seeded_and_its_limits_reduce_to_greedy(moe_checkpoint):
    eng = engine.Engine(loader.load(moe_checkpoint[0], jnp.float32))
    p = [PROMPTS[0]]
    greedy = eng.generate(p, 16, SamplingParams()).tokens
    hot = SamplingParams(temperature=1.5, seed=7)
    assert eng.generate(p, 16, hot).tokens == eng.generate(p, 16, hot).tokens
    assert eng.generate(p, 16, SamplingParams(temperature=1.5, seed=8)).tokens != eng.generate(p, 16, hot).tokens
    assert eng.generate(p, 16, SamplingParams(temperature=1.5, top_k=1, seed=7)).tokens == greedy
    assert eng.generate(p, 16, SamplingParams(temperature=1.5, top_p=1e-6, seed=7)).tokens == greedy


def test_sharded_checkpoint_loads_the_same_weights(tmp_path, moe_checkpoint):
    from conftest import make_hf_checkpoint

    make_hf_checkpoint(tmp_path, "moe", max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    a = loader.load(tmp_path, jnp.float32)
    b = loader.load(moe_checkpoint[0], jnp.float32)
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        np.testing.assert_array_equal(x, y)


def jax_leaves(ckpt):
    import jax

    return jax.tree.leaves((ckpt.params, list(ckpt.experts.gate_up), list(ckpt.experts.down)))


def test_bfloat16_load_stays_close_to_float32(moe_checkpoint):
    path, hf = moe_checkpoint
    lg = engine.Engine(loader.load(path, jnp.bfloat16)).logits([PROMPTS[0]])[0]
    ref = hf_logits(hf, PROMPTS[0])
    assert np.abs(lg - ref).max() < 0.1 * np.abs(ref).max()
