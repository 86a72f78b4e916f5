"""Training: init, the load-balancing loss, the blocked expert FFN, and a few AdamW steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax import train
from dynaexq_jax.models.config import Qwen3MoeConfig
from dynaexq_jax.experts.expert_state import DenseExperts


def tiny_cfg() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        num_experts=8, experts_per_token=2, moe_intermediate_size=16, intermediate_size=48,
        rope_theta=10000.0, max_position_embeddings=128,
    )


def test_load_balancing_loss_is_one_under_uniform_routing():
    L, E, N, k = 3, 8, 40, 2
    counts = jnp.full((L, E), N * k / E)  # every expert gets the same share of the N*k pairs
    probs = jnp.full((L, E), N / E)  # router probabilities summed over N tokens, each 1/E
    assert float(train.load_balancing_loss(counts, probs, jnp.float32(N))) == pytest.approx(1.0, abs=1e-6)
    # Collapsed routing (everything to expert 0 with probability 1) costs num_experts.
    onehot = jnp.zeros((L, E)).at[:, 0].set(1.0)
    assert float(train.load_balancing_loss(onehot * N * k, onehot * N, jnp.float32(N))) == pytest.approx(E)


def test_gradient_flows_through_probs_only():
    counts = jnp.array([[3.0, 1.0, 0.0, 0.0]])
    g_counts, g_probs = jax.grad(train.load_balancing_loss, argnums=(0, 1))(counts, jnp.ones((1, 4)), 4.0)
    assert not np.any(np.asarray(g_counts))
    np.testing.assert_allclose(np.asarray(g_probs), 4 * np.array([[0.75, 0.25, 0, 0]]) / 4, atol=1e-6)


def test_init_is_deterministic_and_hf_like():
    cfg = tiny_cfg()
    p1, e1 = train.init_params(cfg, seed=7)
    p2, e2 = train.init_params(cfg, seed=7)
    p3, _ = train.init_params(cfg, seed=8)
    for a, b in zip(jax.tree.leaves((p1, e1)), jax.tree.leaves((p2, e2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = lambda p: np.asarray(p["layers_0"]["self_attn"]["q_proj"]["kernel"])
    assert not np.array_equal(q(p1), q(p3))
    np.testing.assert_array_equal(np.asarray(p1["norm"]["weight"]), 1.0)
    emb = np.asarray(p1["embed_tokens"]["embedding"])
    assert abs(emb.std() - train.INIT_STD) < 0.003
    assert abs(np.asarray(e1.gate_up[0]).std() - train.INIT_STD) < 0.002
    assert isinstance(e1, DenseExperts)


def test_blocked_experts_match_dense_experts():
    key = jax.random.key(0)
    E, H, I, T, k = 8, 32, 16, 300, 3
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    wgu, wd = jax.random.normal(k1, (E, H, 2 * I)), jax.random.normal(k2, (E, I, H))
    x = jax.random.normal(k3, (T, H))
    # Skewed routing: some experts get many blocks, some none.
    ids = jnp.stack([jax.random.choice(kk, E, (T,), p=jnp.arange(E, 0, -1) ** 2 * 1.0) for kk in jax.random.split(k4, k)], 1)
    w = jax.random.uniform(k5, (T, k))
    dense = DenseExperts(gate_up=(wgu,), down=(wd,)).ffn(0, x, ids, w)
    blocked = train.BlockedExperts(gate_up=(wgu,), down=(wd,)).ffn(0, x, ids, w)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(dense), rtol=1e-4, atol=1e-3)


def run_steps(cfg, batch, n, seed=0):
    params, experts = train.init_params(cfg, seed)
    opt = train.make_optimizer(1e-2, total_steps=n, warmup_steps=1)
    state = train.init_state(params, experts, opt)
    step = train.make_train_step(cfg, opt, lb_coef=0.01)
    valid = np.ones(batch.shape, bool)
    losses = []
    for _ in range(n):
        state, m = step(state, batch, valid)
        losses.append(float(m["loss"]))
    return losses, state


def test_train_steps_reduce_loss_and_are_deterministic():
    cfg = tiny_cfg()
    batch = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17)).astype(np.int32)
    losses, state = run_steps(cfg, batch, 6)
    assert losses[0] == pytest.approx(np.log(cfg.vocab_size), abs=0.1)  # ~uniform at init
    assert losses[-1] < losses[0] - 0.1
    again, state2 = run_steps(cfg, batch, 6)
    assert again == losses
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.step) == 6


def test_padding_does_not_count():
    cfg = tiny_cfg()
    model_params, experts = train.init_params(cfg, 0)
    from dynaexq_jax.models.decoder import Qwen3Moe

    model = Qwen3Moe(cfg, jnp.float32)
    batch = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    valid = np.ones(batch.shape, bool)
    valid[1] = False  # second row is padding
    loss_fn = jax.jit(lambda b, v: train.loss_fn(model_params, experts, model, b, v, 0.0)[0])
    loss, loss1 = loss_fn(batch, valid), loss_fn(batch[:1], valid[:1])
    assert float(loss) == pytest.approx(float(loss1), rel=1e-5)
