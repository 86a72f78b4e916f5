"""Training: init, the load-balancing loss, the blocked expert FFN, and a few AdamW steps."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dynaexq_jax import train
from dynaexq_jax.experts.expert_state import ExpertState, ExpertTier
from dynaexq_jax.experts.matmul import routed_ffn
from dynaexq_jax.models.config import ModelConfig


def tiny_cfg() -> ModelConfig:
    return ModelConfig(
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
    layer = lambda p: p["layers"][0]
    qkv = lambda p: np.asarray(layer(p)["self_attn"]["qkv_proj"]["kernel"])
    assert not np.array_equal(qkv(p1), qkv(p3))
    assert abs(qkv(p1).std() - train.INIT_STD) < 0.002
    for norm in (p1["norm"], layer(p1)["input_layernorm"], layer(p1)["self_attn"]["qk_norm"]):
        np.testing.assert_array_equal(np.asarray(norm["weight"]), 1.0)
    emb = np.asarray(p1["embed_tokens"]["embedding"])
    assert abs(emb.std() - train.INIT_STD) < 0.003
    assert isinstance(e1, train.TrainExperts)
    L, E, H, I = len(cfg.moe_layers), cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert e1.gate_up.shape == (L, E, H, 2 * I) and e1.down.shape == (L, E, I, H)
    assert abs(np.asarray(e1.gate_up).std() - train.INIT_STD) < 0.002


# ------------------------------------------------------------------ the blocked expert FFN


def routing_case(T=300, k=3, L=2, E=8, H=32, I=16):
    """Experts of L MoE layers and a skewed routing of T tokens with scattered padding tokens."""
    keys = jax.random.split(jax.random.key(0), 7)
    experts = train.TrainExperts(gate_up=0.3 * jax.random.normal(keys[0], (L, E, H, 2 * I)),
                                 down=0.3 * jax.random.normal(keys[1], (L, E, I, H)))
    x = jax.random.normal(keys[2], (T, H))
    # k distinct experts per token, skewed: some experts fill several blocks, the last gets none.
    logp = jnp.log(jnp.arange(E, 0, -1) ** 2 * 1.0).at[-1].set(-jnp.inf)
    ids = jnp.argsort(-(logp + jax.random.gumbel(keys[3], (T, E))), axis=1)[:, :k].astype(jnp.int32)
    weights = jax.random.uniform(keys[4], (T, k))
    valid = jax.random.uniform(keys[5], (T,)) > 0.2
    residual = jax.random.normal(keys[6], (T, H))
    return experts, x, ids, weights, valid, residual


def per_pair_reference(experts, layer, x, ids, weights, valid, residual):
    """float64 numpy, one (token, expert) pair at a time, padding tokens skipped."""
    gate_up = np.asarray(experts.gate_up, np.float64)[layer]
    down = np.asarray(experts.down, np.float64)[layer]
    x, ids, weights, valid = (np.asarray(a) for a in (x, ids, weights, valid))
    out = np.array(residual, np.float64)
    I = down.shape[1]
    for t in np.flatnonzero(valid):
        for e, w in zip(ids[t], weights[t]):
            h = x[t].astype(np.float64) @ gate_up[e]
            g, u = h[:I], h[I:]
            out[t] += w * ((g / (1 + np.exp(-g)) * u) @ down[e])
    return out


def dense_reference(experts, layer, x, ids, weights, valid, residual):
    """Every expert on every token, then the routed ones picked: differentiable, no sorting."""
    h = jnp.einsum("th,ehf->tef", x, experts.gate_up[layer], precision="highest")
    g, u = jnp.split(h, 2, axis=-1)
    y = jnp.einsum("tei,eih->teh", jax.nn.silu(g) * u, experts.down[layer], precision="highest")  # [T, E, H]
    picked = jnp.take_along_axis(y, ids[:, :, None], axis=1)  # [T, k, H]
    return residual + jnp.einsum("tkh,tk->th", picked, weights * valid[:, None], precision="highest")


class BlockedFFNTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_per_pair_reference_with_padding_tokens(self):
        experts, x, ids, w, valid, residual = routing_case()
        # The case covers an unused expert (7) and one that fills several blocks (0).
        assert int(jnp.sum(ids == 7)) == 0 and int(jnp.sum(ids == 0)) > 2 * train.BLOCK_ROWS
        layer = jnp.int32(1)  # traced under jit, as in the decoder's layer scan
        got = self.variant(train.blocked_ffn)(experts, layer, x, ids, w, valid, residual)
        want = per_pair_reference(experts, 1, x, ids, w, valid, residual)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(got)[~np.asarray(valid)], np.asarray(residual)[~np.asarray(valid)])

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_match_dense_reference(self):
        experts, x, ids, w, valid, residual = routing_case(T=70)
        layer = jnp.int32(0)

        def loss(ffn):
            # A fixed random projection of the output, so every output element matters.
            proj = jax.random.normal(jax.random.key(1), residual.shape)
            return lambda e, x, w, r: jnp.sum(proj * ffn(e, layer, x, ids, w, valid, r))

        grads = self.variant(jax.grad(loss(train.blocked_ffn), argnums=(0, 1, 2, 3)))(experts, x, w, residual)
        want = jax.grad(loss(dense_reference), argnums=(0, 1, 2, 3))(experts, x, w, residual)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)
        assert not np.any(np.asarray(grads[0].gate_up[1]))  # the other layer's experts get nothing

    def test_agrees_with_the_inference_ffn(self):
        """What is trained is what `routed_ffn` serves: one dense tier of the same weights."""
        experts, x, ids, w, valid, residual = routing_case()
        L, E, H, I2 = experts.gate_up.shape
        state = ExpertState(
            tiers=(ExpertTier(experts.gate_up.reshape(L * E, H, I2), experts.down.reshape(L * E, I2 // 2, H)),),
            tier_of=jnp.zeros((L, E), jnp.int32),
            row_of=jnp.arange(L * E, dtype=jnp.int32).reshape(L, E),
        )
        got = jax.jit(train.blocked_ffn)(experts, jnp.int32(1), x, ids, w, valid, residual)
        want = jax.jit(routed_ffn)(state, jnp.int32(1), x, ids, w, valid, residual)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------ training


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
    # 4 x 16 tokens: a decode-sized batch, where the inference decoder would pick its Pallas
    # kernels (no derivative rule); the training decoder never does.
    batch = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17)).astype(np.int32)
    losses, state = run_steps(cfg, batch, 6)
    assert losses[0] == pytest.approx(np.log(cfg.vocab_size), abs=0.1)  # ~uniform at init
    assert losses[-1] < losses[0] - 0.1
    again, state2 = run_steps(cfg, batch, 6)
    assert again == losses
    for a, b in zip(jax.tree.leaves((state.params, state.experts)), jax.tree.leaves((state2.params, state2.experts))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.step) == 6


def test_weight_decay_spares_norms():
    # Stacked per segment, a layer's norm weights are matrices: the mask must go by name.
    params, experts = train.init_params(tiny_cfg(), 0)
    opt = train.make_optimizer(1e-2, total_steps=4, warmup_steps=1)
    tree = (params, experts)
    zeros = jax.tree.map(jnp.zeros_like, tree)
    _, opt_state = opt.update(zeros, opt.init(tree), tree)  # step 0 of the warmup: lr 0
    updates, _ = opt.update(zeros, opt_state, tree)
    new_params, new_experts = optax.apply_updates(tree, updates)
    layer, new_layer = params["layers"][0], new_params["layers"][0]
    for name in ("input_layernorm", "post_attention_layernorm"):
        np.testing.assert_array_equal(np.asarray(new_layer[name]["weight"]), np.asarray(layer[name]["weight"]))
    np.testing.assert_array_equal(np.asarray(new_layer["self_attn"]["qk_norm"]["weight"]), 1.0)
    shrunk = lambda new, old: np.all(np.abs(np.asarray(new)) < np.abs(np.asarray(old)))
    assert shrunk(new_layer["self_attn"]["qkv_proj"]["kernel"], layer["self_attn"]["qkv_proj"]["kernel"])
    assert not np.array_equal(np.asarray(new_experts.down), np.asarray(experts.down))


def test_padding_does_not_count():
    cfg = tiny_cfg()
    params, experts = train.init_params(cfg, 0)
    model = train.training_decoder(cfg)
    batch = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    valid = np.ones(batch.shape, bool)
    valid[1] = False  # second row is padding
    loss_fn = jax.jit(lambda b, v: train.loss_fn(params, experts, model, b, v, 0.01)[0])
    loss, loss1 = loss_fn(batch, valid), loss_fn(batch[:1], valid[:1])
    assert float(loss) == pytest.approx(float(loss1), rel=1e-5)
