"""DeepSeek-V3 beyond the parity every family gets (tests/test_families.py): latent attention
(MLA) without a q LoRA, decode in the latent space step by step against transformers, the
latent KV cache and its plan, the latent attention kernel against float64, the group-limited
sigmoid router against transformers' own, block-wise FP8 weights dequantized on load, and the
published model's plan on one GPU and on a mesh.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dynaexq_jax import budget
from dynaexq_jax.io import loader, preset
from dynaexq_jax.models import registry
from dynaexq_jax.models.decoder import Decoder, KVCache
from dynaexq_jax.models.layers import route
from dynaexq_jax.runtime import engine

from conftest import write_tokenizer
from test_families import COMMON, FAMILIES, PROMPTS, _generate_script, checkpoint

FAMILY = ("deepseek_v3", "mla-yarn-groups")


def _hf_config(**change):
    import transformers

    _, _, shared, configs = FAMILIES["deepseek_v3"]
    return transformers.DeepseekV3Config(**{**COMMON, **shared, **configs[FAMILY[1]], **change})


@pytest.fixture(scope="module")
def no_q_lora(tmp_path_factory):
    """One query projection (q_lora_rank null), rotary dims not interleaved, plain RoPE, tied embeddings."""
    import transformers

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("hf-deepseek-no-q-lora")
    hf = transformers.DeepseekV3ForCausalLM(_hf_config(q_lora_rank=None, rope_interleave=False, rope_parameters=None,
                                                       tie_word_embeddings=True, n_group=1, topk_group=1)).eval()
    with torch.no_grad():
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    hf.save_pretrained(path)
    write_tokenizer(path)
    return path, hf


def test_latent_attention_without_a_q_lora_matches_transformers_at_every_position(no_q_lora):
    path, hf = no_q_lora
    eng = engine.Engine(loader.load(path, jnp.float32))
    assert eng.cfg.q_lora_rank == 0 and not eng.cfg.rope_interleave and eng.cfg.tie_word_embeddings
    for ids, lg in zip(PROMPTS, eng.logits(PROMPTS)):  # one left-padded batch
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(lg, ref, atol=1e-4, rtol=0)


def test_decode_in_the_latent_space_matches_transformers_at_every_step(tmp_path_factory):
    """A fresh prefill (keys and values expanded per head), then decode steps over the latent
    cache (the up-projections absorbed) and a chunk continued over it: transformers' logits at
    every position."""
    _, _, path, hf = checkpoint(tmp_path_factory, *FAMILY)
    eng = engine.Engine(loader.load(path, jnp.float32))
    cfg, dec = eng.cfg, Decoder(eng.cfg, jnp.float32)
    step = jax.jit(lambda cache, t, pos, fresh: dec(eng.params, eng.policy.experts, cache, t, pos,
                                                   jnp.ones_like(t, bool), fresh=fresh)[:2], static_argnums=3)
    ids = [5, 17, 42, 9, 100, 7, 250, 33, 12, 64, 3, 8]
    tokens, pos = jnp.asarray([ids], jnp.int32), jnp.arange(len(ids), dtype=jnp.int32)[None]
    logits, cache = step(KVCache.empty(cfg, 1, 16, jnp.float32), tokens[:, :5], pos[:, :5], True)
    ours = [logits[0]]
    for t in range(5, 8):  # one token at a time
        logits, cache = step(cache, tokens[:, t:t + 1], pos[:, t:t + 1], False)
        ours.append(logits[0])
    logits, cache = step(cache, tokens[:, 8:], pos[:, 8:], False)  # a chunk over the cache
    ours.append(logits[0])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.concatenate(ours), ref, atol=1e-4, rtol=0)


def test_the_kv_cache_holds_the_latent_and_the_plan_counts_it(tmp_path_factory):
    _, _, path, _ = checkpoint(tmp_path_factory, *FAMILY)
    cfg = loader.load(path, jnp.float32).config
    C, R = cfg.kv_lora_rank, cfg.head_dim
    cache = KVCache.empty(cfg, 3, 32, jnp.float32)
    assert cache.kv.shape == (cfg.num_layers, 1, 3, 1, 32, C + R)  # one latent per token, no heads
    held = sum(a.nbytes for a in jax.tree.leaves(cache)) - cache.index.nbytes
    assert KVCache.nbytes_for(cfg, 3, 32, jnp.float32) == held
    assert budget.kv_cache_nbytes(cfg, 3, 32, 4) == held - cache.start.nbytes + 3 * 32  # + the validity mask
    # The published model: 512 + 64 values per token and layer, against 128 heads x (192 + 128) expanded.
    v3 = registry.adapter_for(preset.DEEPSEEK_V3).config_from_hf(preset.DEEPSEEK_V3)
    assert budget.kv_cache_nbytes(v3, 1, 4096, 2) == 61 * 4096 * 576 * 2 + 4096


def test_latent_attention_kernel_matches_float64():
    """The Pallas kernel (interpreted) over a stacked latent cache: left padding, each row's own
    current slot, several splits of the slots, heads not a multiple of the kernel's block."""
    from pallas_kernels.latent_attention import latent_attention

    rng = np.random.default_rng(0)
    L, B, S, C, R, NH, scale = 2, 3, 64, 16, 8, 20, 0.3
    cache = rng.standard_normal((L, 1, B, 1, S, C + R)).astype(np.float32)
    q = rng.standard_normal((B, NH, C + R)).astype(np.float32)
    start, index = np.array([0, 10, 40]), np.array([30, 50, 63])
    out = latent_attention(jnp.asarray(q), jnp.asarray(cache), jnp.int32(1), jnp.asarray(start), jnp.asarray(index),
                           rank=C, scale=scale, interpret=True, block_k=8)
    for b in range(B):
        e = cache[1, 0, b, 0, start[b]:index[b] + 1].astype(np.float64)
        s = q[b].astype(np.float64) @ e.T * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        np.testing.assert_allclose(out[b], (p / p.sum(-1, keepdims=True)) @ e[:, :C], atol=2e-6, rtol=0)


def test_group_limited_sigmoid_router_matches_transformers():
    """Chosen experts and their weights against transformers' DeepseekV3TopkRouter, with a
    correction bias that changes the choice and groups that exclude experts."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf_cfg = _hf_config(n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=6)
    cfg = registry.adapter_for(hf_cfg.to_dict()).config_from_hf(hf_cfg.to_dict())
    torch.manual_seed(0)
    router = DeepseekV3TopkRouter(hf_cfg)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.3)
        router.e_score_correction_bias.normal_(0.0, 0.3)
        x = torch.randn(64, hf_cfg.hidden_size)
        logits, weights, ids = router(x)
    probs, top_p, top_i = route(cfg, jnp.asarray(logits.numpy()), jnp.asarray(router.e_score_correction_bias.numpy()))
    order = np.argsort(ids.numpy(), -1)  # transformers' top-k is unsorted
    np.testing.assert_array_equal(np.sort(np.asarray(top_i), -1), np.take_along_axis(ids.numpy(), order, -1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(top_p), np.argsort(np.asarray(top_i), -1), -1),
                               np.take_along_axis(weights.numpy(), order, -1), atol=1e-6, rtol=0)
    np.testing.assert_allclose(probs, torch.sigmoid(logits).numpy(), atol=1e-6, rtol=0)
    groups = np.asarray(top_i) // 4
    assert all(len(set(g)) <= 3 for g in groups)  # within topk_group groups
    bias_free = np.argsort(-torch.sigmoid(logits).numpy(), -1)[:, :6]
    assert (np.sort(bias_free, -1) != np.sort(np.asarray(top_i), -1)).any()  # the bias changed choices


# ----------------------------------------------------------------- block-wise FP8, as released


def _fp8_blocks(w: torch.Tensor, block: int):
    """w [out, in] -> (float8_e4m3fn w, float32 scales [ceil(out/b), ceil(in/b)]), one scale per
    block (its largest magnitude over e4m3's 448), partial blocks at the edges."""
    out, inp = w.shape
    so, si = -(-out // block), -(-inp // block)
    pad = torch.zeros(so * block, si * block)
    pad[:out, :inp] = w
    blocks = pad.reshape(so, block, si, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(so * block, si * block)[:out, :inp].to(torch.float8_e4m3fn)
    return q, scale.float()


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """The family checkpoint with every 2-D projection (attention, routers excepted, dense and
    shared MLPs, experts) stored as F8_E4M3 with 16 x 16 block scales and a quantization_config
    as DeepSeek ships it; transformers' model on the dequantized weights."""
    import copy

    from safetensors.torch import load_file, save_file

    _, _, src, hf = checkpoint(tmp_path_factory, *FAMILY)
    path = tmp_path_factory.mktemp("hf-deepseek-fp8")
    tensors = load_file(src / "model.safetensors")
    decoded = copy.deepcopy(hf)
    ref = {}
    for name in [n for n, t in tensors.items() if t.ndim == 2 and "proj" in n]:
        q, scale = _fp8_blocks(tensors[name], 16)
        tensors[name], tensors[name + "_scale_inv"] = q, scale
        full = scale.double().repeat_interleave(16, 0).repeat_interleave(16, 1)[:q.shape[0], :q.shape[1]]
        ref[name] = q.double() * full  # the float64 dequantization
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():
        decoded.load_state_dict({n: ref[n].float() if n in ref else t for n, t in decoded.state_dict().items()},
                                strict=False)
        # load_state_dict goes through the fused in-memory experts: set them from the per-expert names
        for i, layer in enumerate(decoded.model.layers):
            if hasattr(layer.mlp, "experts"):
                E = layer.mlp.experts.gate_up_proj.shape[0]
                p = f"model.layers.{i}.mlp.experts."
                layer.mlp.experts.gate_up_proj.copy_(torch.stack([torch.cat(
                    [ref[f"{p}{e}.gate_proj.weight"], ref[f"{p}{e}.up_proj.weight"]]) for e in range(E)]).float())
                layer.mlp.experts.down_proj.copy_(torch.stack([ref[f"{p}{e}.down_proj.weight"]
                                                               for e in range(E)]).float())
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = dict(preset.DEEPSEEK_V3["quantization_config"], weight_block_size=[16, 16])
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    return path, ref, decoded


def test_fp8_block_weights_load_as_their_float64_dequantization(fp8_checkpoint):
    path, ref, _ = fp8_checkpoint
    ckpt = loader.load(path, jnp.float32)
    cfg = ckpt.config
    moe = cfg.moe_layers.index(1)
    p = "model.layers.1."
    kv_a = ckpt.params["layers"][1]["self_attn"]["kv_a_proj_with_mqa"]["kernel"][0]  # 24 rows: a partial block
    np.testing.assert_allclose(np.asarray(kv_a), ref[p + "self_attn.kv_a_proj_with_mqa.weight"].numpy().T,
                               atol=1e-7, rtol=0)
    I = cfg.moe_intermediate_size
    np.testing.assert_allclose(ckpt.experts.gate_up[moe][3][:, :I], ref[p + "mlp.experts.3.gate_proj.weight"].numpy().T,
                               atol=1e-7, rtol=0)
    np.testing.assert_allclose(ckpt.experts.down[moe][3], ref[p + "mlp.experts.3.down_proj.weight"].numpy().T,
                               atol=1e-7, rtol=0)


def test_fp8_checkpoint_matches_transformers_on_the_dequantized_weights(fp8_checkpoint):
    path, _, decoded = fp8_checkpoint
    eng = engine.Engine(loader.load(path, jnp.float32))
    for ids, lg in zip(PROMPTS, eng.logits(PROMPTS)):
        with torch.no_grad():
            ref = decoded(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(lg, ref, atol=1e-4, rtol=0)


def test_fp8_without_its_scales_is_a_one_line_error(fp8_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _, _ = fp8_checkpoint
    for f in ("config.json", "tokenizer.json"):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name + "_scale_inv"] = tensors[name + "_scale_inv"][:1]  # a row of blocks short
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(loader.CheckpointError) as e:
        loader.load(tmp_path, jnp.float32)
    assert name in str(e.value) and "weight_block_size" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------- the published model's plan


def test_one_141gb_gpu_is_refused_naming_the_minimum_and_the_mesh_that_fits(tmp_path, capsys):
    """Even int2 fallbacks exceed one H200: the refusal names the minimum and the mesh whose
    per-device share fits; on --mesh expert=8 each device's plan fits with int4 fallbacks."""
    generate = _generate_script()
    (tmp_path / "config.json").write_text(json.dumps(preset.DEEPSEEK_V3))
    cfg = registry.adapter_for(preset.DEEPSEEK_V3).config_from_hf(preset.DEEPSEEK_V3)
    int2 = len(cfg.moe_layers) * sum(budget.quantized_nbytes((256,) + s, 2, 128) for s in budget.expert_shapes(cfg))
    assert int2 > 141e9  # the fallbacks alone: 184 GB
    assert generate.main(["--model", str(tmp_path), "--dry-run", "--budget", "141GB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: budget 141.00 GB cannot hold the int2 fallback experts "
                          f"({budget.format_size(int2)})") and "\n" not in err
    assert "the minimum is " in err and "on --mesh expert=8 (int4 fallbacks)" in err
    assert generate.main(["--model", str(tmp_path), "--dry-run", "--budget", "141GB", "--mesh", "expert=8",
                          "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    assert plan["lo_bits"] == 4 and plan["total"] <= 141e9 and plan["slots"] > 0
    assert plan["num_experts_total"] == 58 * 256 // 8
