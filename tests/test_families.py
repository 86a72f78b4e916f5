"""Every supported MoE family against transformers' own model on tiny checkpoints written by
transformers' `save_pretrained` (random weights, float32), through every policy; and the
published configs of the real models: parameter counts and dry-run plans from config.json.

Select one family with `python -m pytest tests/test_families.py -k <model_type>`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dynaexq_jax import budget
from dynaexq_jax.experts import quant
from dynaexq_jax.io import hf_export, loader, preset
from dynaexq_jax.models import registry
from dynaexq_jax.models.config import ConfigError
from dynaexq_jax.models.decoder import Decoder
from dynaexq_jax.policies import dynaexq
from dynaexq_jax.runtime import engine
from dynaexq_jax.runtime.build import build_engine

from conftest import VOCAB, write_tokenizer

PROMPTS = [[5, 17, 42, 9, 100, 7, 250, 33, 12], [64, 3], [8, 8, 19, 200, 45]]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, rope_theta=10000.0, initializer_range=0.3, eos_token_id=0)

# model_type -> (transformers config class, model class, shared kwargs, {name: the configuration's own}).
# Two configurations per family: the family's special features, dense layers where it has them,
# tied and untied embeddings.
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=32, head_dim=16), {
        "untied": dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
        "tied": dict(num_hidden_layers=3, num_local_experts=6, num_experts_per_tok=3, tie_word_embeddings=True,
                     num_key_value_heads=4),
    }),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=32, pad_token_id=1), {
        "untied": dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False,
                       tie_word_embeddings=False),
        # clip_qkv clamps a good share of q, k and v at this init; biases on q, k, v and o.
        "clip-bias-tied": dict(num_hidden_layers=2, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
                               clip_qkv=1.5, attention_bias=True, tie_word_embeddings=True),
    }),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48), {
        "untied": dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                       tie_word_embeddings=False),
        # a dense layer between MoE layers (three scanned segments), no qkv bias, renormalised top-k
        "mixed-tied": dict(num_hidden_layers=3, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
                           tie_word_embeddings=True, mlp_only_layers=[1], qkv_bias=False),
    }),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(intermediate_size=32, head_dim=16), {
        # LayerNorms with bias everywhere; biases on q, k, v, o and the LM head; sparsemixer top-2
        "bias-untied": dict(num_hidden_layers=2, num_local_experts=4, attention_bias=True, lm_head_bias=True,
                            tie_word_embeddings=False),
        # longrope (the prompts stay within original_max_position_embeddings: see models/phimoe.py),
        # a wide sparsemixer window (weights well below 1)
        "longrope-tied": dict(num_hidden_layers=2, num_local_experts=6, router_jitter_noise=0.6,
                              tie_word_embeddings=True, rope_parameters=dict(
                                  rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=64,
                                  short_factor=[1.0, 1.1, 1.3, 1.2, 1.8, 1.9, 1.6, 1.7],
                                  long_factor=[4.2, 5.7, 5.3, 2.0, 5.4, 2.1, 4.9, 2.7], short_mscale=1.1,
                                  long_mscale=1.3)),
    }),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(intermediate_size=32, head_dim=16), {
        # layer 0 slides over 4 keys (the prompt is 9), layer 1 attends to all; YaRN with a
        # ramp inside the head's dims; a SwiGLU limit the pre-activations cross.
        "yarn-window-untied": dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                   swiglu_limit=2.0, tie_word_embeddings=False, rope_parameters=dict(
                                       rope_type="yarn", rope_theta=10000.0, factor=32.0, beta_fast=8.0,
                                       beta_slow=1.0, truncate=False, original_max_position_embeddings=16)),
        # layer types of our choosing (two sliding layers in a row: one scanned segment mixes
        # both kinds), no attention biases, plain RoPE, tied embeddings
        "types-tied": dict(num_hidden_layers=3, num_local_experts=6, num_experts_per_tok=3, sliding_window=3,
                           layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                           attention_bias=False, tie_word_embeddings=True,
                           rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    }),
    # The families added since: one configuration each, covering the family's features at once.
    # latent attention through a q LoRA (tests/test_deepseek_v3.py runs one without), YaRN with
    # mscale on the softmax scale and a ramp inside the rotary dims, group-limited sigmoid
    # routing (4 groups, 2 kept) with its correction bias and routed scaling, two shared
    # experts, a dense first layer.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, kv_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12), {
        "mla-yarn-groups": dict(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                                topk_group=2, first_k_dense_replace=1, q_lora_rank=24, n_shared_experts=2,
                                routed_scaling_factor=2.5, tie_word_embeddings=False, rope_parameters=dict(
                                    rope_type="yarn", rope_theta=10000.0, factor=8.0, beta_fast=8.0, beta_slow=1.0,
                                    mscale=1.0, mscale_all_dim=0.8, original_max_position_embeddings=16)),
    }),
    # q/k norms per head, q/k/v biases, RoPE on half of each head, DeepSeek-V3's routing (2 groups,
    # 1 kept) and shared expert, a dense first layer.
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(intermediate_size=96, moe_intermediate_size=32, head_dim=16), {
        "qknorm-bias-groups": dict(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                   topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.5, use_qk_norm=True,
                                   attention_bias=True, tie_word_embeddings=False, rope_parameters=dict(
                                       rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)),
    }),
    # q/k norms over the whole projections, RoPE on a quarter of each head (rotary_dim as released),
    # sigmoid routing with the correction bias, tied embeddings.
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(intermediate_size=32, head_dim=16, bos_token_id=1), {
        "rotary-tied": dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=3, rotary_dim=4,
                            tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    }),
}
CASES = [(fam, name) for fam, spec in FAMILIES.items() for name in spec[3]]
# Family-independent features (FloE, big-little, the command line) run on the families before
# these and on DeepSeek-V3, for the sigmoid router and latent attention: GLM-4.5's and
# MiniMax-M2's layers are all among theirs, so their parity tests cover them (and CI time).
FEATURE_FAMILIES = sorted(set(FAMILIES) - {"glm4_moe", "minimax_m2"})


def make_family_checkpoint(path, family: str, name: str, seed: int = 0):
    import transformers

    cfg_cls, model_cls, shared, configs = FAMILIES[family]
    torch.manual_seed(seed)
    kw = {**COMMON, **shared, **configs[name]}
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
    if family == "gpt_oss":  # transformers zeroes the expert biases at init: make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for b in (layer.mlp.experts.gate_up_proj_bias, layer.mlp.experts.down_proj_bias):
                    b.normal_(0.0, 0.3)
    for n, b in model.named_buffers():  # and the sigmoid routers' correction biases
        if n.endswith("e_score_correction_bias"):
            b.normal_(0.0, 0.3)
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


_MADE: dict[tuple[str, str], tuple] = {}


def checkpoint(tmp_path_factory, family: str, name: str):
    """(family, configuration name, directory, transformers model), written once per session."""
    if (family, name) not in _MADE:
        path = tmp_path_factory.mktemp(f"hf-{family}-{name}")
        _MADE[family, name] = family, name, path, make_family_checkpoint(path, family, name)
    return _MADE[family, name]


@pytest.fixture(scope="session", params=CASES, ids=[f"{f}-{n}" for f, n in CASES])
def family_checkpoint(request, tmp_path_factory):
    """Each tiny configuration, float32 (see `checkpoint`)."""
    return checkpoint(tmp_path_factory, *request.param)


@pytest.fixture(scope="session")
def full_engine(family_checkpoint):
    family, _, path, hf = family_checkpoint
    return engine.Engine(loader.load(path, jnp.float32)), hf


def hf_generate(hf, prompts, n):
    """transformers' greedy generate on left-padded prompts -> the new tokens of each."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[:, P:].tolist()


# ----------------------------------------------------------------- parity with transformers


def test_config_maps_to_the_family_and_back(family_checkpoint):
    family, _, path, hf = family_checkpoint
    cfg = registry.read_config(path)
    assert cfg.model_type == family
    fam = registry.adapter(cfg)
    assert fam.config_from_hf(fam.config_to_hf(cfg)) == cfg
    # The plan's parameter count is the checkpoint's (buffers it saves included: the routers'
    # correction biases), and the non-expert bytes are the decoder's params, each at its dtype.
    saved = {t.data_ptr(): t for t in hf.state_dict().values()}  # tied embeddings once
    assert budget.parameter_count(cfg) == sum(t.numel() for t in saved.values())
    for dtype in (jnp.float32, jnp.bfloat16):
        shapes = jax.tree.leaves(Decoder(cfg, dtype).param_shapes())
        itemsize = jnp.dtype(dtype).itemsize
        assert budget.non_expert_nbytes(cfg, itemsize) == (sum(math.prod(s.shape) * s.dtype.itemsize for s in shapes)
                                                           + budget.expert_bias_count(cfg) * itemsize)


def test_logits_match_transformers(full_engine):
    eng, hf = full_engine
    for ids, lg in zip(PROMPTS, eng.logits(PROMPTS)):  # one left-padded batch
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(lg[-1], ref[-1], atol=1e-4, rtol=0)
        np.testing.assert_allclose(lg, ref, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers_generate(full_engine):
    eng, hf = full_engine
    ours = eng.generate([PROMPTS[0]], max_new_tokens=16, eos_token_ids=()).tokens
    assert ours == hf_generate(hf, [PROMPTS[0]], 16)
    assert len(set(ours[0])) > 2, "degenerate reference: the test would not tell much"
    assert eng.generate(PROMPTS, max_new_tokens=12, eos_token_ids=()).tokens == hf_generate(hf, PROMPTS, 12)


# ----------------------------------------------------------------- every policy


PROMPT = PROMPTS[0]
OPTS = dynaexq.DynaExqOptions(lo_bits=4, group_size=16, rebalance_every=2)


def build(path, policy, opts=OPTS):
    ckpt = loader.load(path, jnp.float32)
    return build_engine(ckpt, policy, budget=None, batch=2, longest_prompt=len(PROMPT), max_new_tokens=16,
                        opts=opts)


def test_offload_or_prefetch_equals_full(family_checkpoint, full_engine):
    """offload on a family's first configuration, prefetch on its second or only one (both share
    the layer loop; prefetch also runs the next layer's router early)."""
    from dynaexq_jax.policies.offload import OffloadPolicy
    from dynaexq_jax.runtime.layerwise import LayerwiseEngine

    family, name, path, _ = family_checkpoint
    prefetch = name != list(FAMILIES[family][3])[0] or len(FAMILIES[family][3]) == 1
    full = full_engine[0]
    batch = [PROMPT, PROMPT[:4]]
    ref = full.generate(batch, 12, eos_token_ids=())
    k = full.cfg.experts_per_token
    ckpt = loader.load(path, jnp.float32)
    # The fewest slots: evicting all the time.
    eng = LayerwiseEngine(ckpt, OffloadPolicy(ckpt.experts, k, prefetch=prefetch, staging=k))
    g = eng.generate(batch, 12, eos_token_ids=())
    assert g.tokens == ref.tokens
    np.testing.assert_array_equal(g.expert_counts, ref.expert_counts)
    assert g.stats["demotions"] > 0 and (g.stats["prefetch_bytes"] > 0) == prefetch
    for ours, theirs in zip(eng.logits(batch), full.logits(batch)):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)  # experts summed in rounds


@pytest.mark.parametrize("family", FEATURE_FAMILIES)
def test_floe_with_every_channel_kept_matches_transformers(family, tmp_path_factory):
    """FloE's channel-sliced experts (gate columns, up, down rows; gpt-oss's interleaved gate|up,
    biases and clamped SwiGLU) at sparsity 0, uncompressed: transformers' logits."""
    from dynaexq_jax.policies.floe import FloeOptions

    _, _, path, hf = checkpoint(tmp_path_factory, family, list(FAMILIES[family][3])[0])
    eng, _ = build_engine(loader.load(path, jnp.float32), "floe", budget=None, batch=len(PROMPTS),
                          longest_prompt=len(PROMPT), max_new_tokens=1, floe=FloeOptions(up_bits=None, sparsity=0.0))
    for ids, lg in zip(PROMPTS, eng.logits(PROMPTS)):  # one left-padded batch
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(lg, ref, atol=1e-4, rtol=0)


def test_dynaexq_with_every_expert_in_a_slot_equals_full(family_checkpoint, full_engine):
    _, _, path, _ = family_checkpoint
    full = full_engine[0]
    eng, plan = build(path, "dynaexq")  # no budget: every expert holds a slot
    assert plan.slots == len(eng.cfg.moe_layers) * eng.cfg.num_experts
    batch = [PROMPT, PROMPT[::-1][:5]]
    assert eng.generate(batch, 12, eos_token_ids=()).tokens == full.generate(batch, 12, eos_token_ids=()).tokens
    np.testing.assert_allclose(eng.logits([PROMPT])[0], full.logits([PROMPT])[0], atol=1e-6, rtol=0)


def test_big_little_with_little_k_equal_k_is_plain_and_little_tokens_drop_their_pairs(family_checkpoint, full_engine):
    from dynaexq_jax.models.big_little import BigLittle

    if family_checkpoint[0] not in FEATURE_FAMILIES:
        pytest.skip(f"big-little is checked on {', '.join(FEATURE_FAMILIES)} (see FEATURE_FAMILIES)")
    full = full_engine[0]
    cfg = full.cfg
    k, L = cfg.experts_per_token, len(cfg.moe_layers)
    same = engine.Engine(full.checkpoint, big_little=BigLittle(k, "router", 0.0))
    np.testing.assert_array_equal(same.logits([PROMPT])[0], full.logits([PROMPT])[0])
    little = engine.Engine(full.checkpoint, big_little=BigLittle(1, "router", 0.0))  # every token little
    g = little.generate([PROMPT], 4, eos_token_ids=())
    s = g.stats["big_little"]
    assert s["little_token_layers"] == s["tokens"] * L and s["pairs_saved"] == s["tokens"] * L * (k - 1)
    assert int(g.expert_counts.sum()) == s["tokens"] * L


def test_static_equals_its_dequantized_reference(family_checkpoint):
    from test_runtime import forward_fn, reference_state

    _, _, path, _ = family_checkpoint
    eng, plan = build(path, "static", opts=dynaexq.DynaExqOptions(lo_bits=3, group_size=16))
    experts = eng.policy.experts
    assert plan.slots == 0 and plan.lo_bits == 3 and len(experts.tiers) == 1
    ckpt = eng.checkpoint
    fwd = forward_fn(ckpt.config)
    tokens = jnp.asarray([PROMPT, PROMPT[::-1]])
    ref = reference_state(experts, ckpt.experts.gate_up, ckpt.experts.down)
    np.testing.assert_allclose(fwd(ckpt.params, experts, tokens), fwd(ckpt.params, ref, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FEATURE_FAMILIES)
def test_generate_script_runs_the_family(family, tmp_path_factory, capsys):
    generate = _generate_script()
    _, _, path, _ = checkpoint(tmp_path_factory, family, list(FAMILIES[family][3])[0])
    code = generate.main(["--model", str(path), "--prompt", "def f", "--max-new-tokens", "4", "--dtype", "float32",
                          "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    ckpt = loader.load(path, jnp.float32)
    ids = ckpt.tokenizer.encode("def f").ids
    assert json.loads(out)["outputs"][0]["token_ids"] == engine.Engine(ckpt).generate([ids], 4).tokens[0]


def _generate_script():
    from dynaexq_jax.cli import generate

    return generate


# ----------------------------------------------------------------- export


def test_export_round_trip_loads_in_transformers(family_checkpoint, tmp_path):
    import transformers

    family, _, path, hf = family_checkpoint
    ckpt = loader.load(path, jnp.float32)
    out = hf_export.save_checkpoint(tmp_path / "ckpt", ckpt.config, ckpt.params, ckpt.experts, eos_token_id=0,
                                    dtype="float32")
    again = loader.load(out, jnp.float32)
    assert again.config == ckpt.config
    for a, b in zip(jax.tree.leaves((ckpt.params, list(ckpt.experts.gate_up), list(ckpt.experts.down))),
                    jax.tree.leaves((again.params, list(again.experts.gate_up), list(again.experts.down)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model_cls = getattr(transformers, FAMILIES[family][1])
    theirs, info = model_cls.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys"), info
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        # (from_pretrained may pick another experts kernel than the model built in memory: not bit-exact)
        np.testing.assert_allclose(theirs.eval()(ids).logits.numpy(), hf(ids).logits.numpy(), atol=1e-5, rtol=0)


def test_fused_experts_load_like_per_expert_ones(moe_checkpoint, tmp_path):
    """transformers' in-memory layout (gate_up_proj [E, 2I, H], gate rows first; down_proj
    [E, H, I]), as an unconverted save writes it, loads to the same experts as the per-expert names."""
    from safetensors.numpy import load_file, save_file

    path, _ = moe_checkpoint
    tensors = load_file(path / "model.safetensors")
    cfg = registry.read_config(path)
    for i in cfg.moe_layers:
        p = f"model.layers.{i}.mlp.experts."
        per = lambda n: np.stack([tensors.pop(f"{p}{e}.{n}.weight") for e in range(cfg.num_experts)])
        gate, up, down = per("gate_proj"), per("up_proj"), per("down_proj")
        tensors[p + "gate_up_proj"], tensors[p + "down_proj"] = np.concatenate([gate, up], axis=1), down
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
    ours, theirs = loader.load(tmp_path, jnp.float32).experts, loader.load(path, jnp.float32).experts
    for a, b in zip([*ours.gate_up, *ours.down], [*theirs.gate_up, *theirs.down]):
        np.testing.assert_array_equal(a, b)


def test_longrope_frequencies_are_phi3s_short_then_long():
    """`rotary_for` against transformers' own longrope frequencies, within the original context
    (short factors) and past it (long factors), with the short and long mscales."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from dynaexq_jax.models.layers import rotary_for

    kw = {**COMMON, **FAMILIES["phimoe"][2], **FAMILIES["phimoe"][3]["longrope-tied"]}
    hf_cfg = transformers.PhimoeConfig(**kw)
    cfg = registry.adapter_for(hf_cfg.to_dict()).config_from_hf(hf_cfg.to_dict())
    rope = kw["rope_parameters"]
    for length, mscale in ((64, rope["short_mscale"]), (65, rope["long_mscale"])):
        inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, None, seq_len=length)
        pos = np.arange(length)[None]
        ang = pos[..., None] * inv_freq.numpy()[None, None]
        ang = np.concatenate([ang, ang], -1)
        cos, sin = rotary_for(cfg, jnp.asarray(pos), jnp.float32)
        np.testing.assert_allclose(np.asarray(cos)[:, :, 0], np.cos(ang) * mscale, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(sin)[:, :, 0], np.sin(ang) * mscale, atol=1e-5, rtol=0)


# ----------------------------------------------------------------- config errors


@pytest.mark.parametrize("family, change, needle", [
    ("mixtral", dict(sliding_window=4096), "sliding_window=4096"),
    ("mixtral", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope scaling 'yarn'"),
    ("olmoe", dict(clip_qkv=-1), "clip_qkv=-1"),
    ("olmoe", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("qwen2_moe", dict(use_sliding_window=True), "use_sliding_window=True"),
    ("qwen2_moe", dict(shared_expert_intermediate_size=None), "shared_expert_intermediate_size"),
    ("phimoe", dict(sliding_window=2048), "sliding_window=2048"),
    ("phimoe", dict(num_experts_per_tok=4), "num_experts_per_tok=4"),
    ("phimoe", dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope scaling 'yarn'"),
    ("gpt_oss", dict(quantization_config={"quant_method": "gptq", "bits": 4}), "quant_method='gptq'"),
    ("gpt_oss", dict(rope_scaling={"rope_type": "longrope", "factor": 4.0}), "rope scaling 'longrope'"),
    ("gpt_oss", dict(layer_types=["sliding_attention"] * 3), "layer_types="),
    ("gpt_oss", dict(sliding_window=0), "sliding_window=0"),
    ("deepseek_v3", dict(rope_scaling={"type": "longrope", "factor": 4.0}), "rope scaling 'longrope'"),
    ("deepseek_v3", dict(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
     "quant_method='bitsandbytes'"),
    ("deepseek_v3", dict(quantization_config={"quant_method": "fp8", "weight_block_size": None}),
     "weight_block_size=None"),
    ("deepseek_v3", dict(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128],
                                              "activation_scheme": "static"}), "activation_scheme='static'"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func='softmax'"),
    ("deepseek_v3", dict(attention_bias=True), "attention_bias=True"),
    ("deepseek_v3", dict(n_group=7), "n_group=7"),
    ("deepseek_v3", dict(kv_lora_rank=None), "'kv_lora_rank'"),
    ("glm4_moe", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling 'yarn'"),
    ("glm4_moe", dict(quantization_config={"quant_method": "compressed-tensors"}), "quant_method='compressed-tensors'"),
    ("glm4_moe", dict(n_shared_experts=0), "n_shared_experts=0"),
    ("glm4_moe", dict(partial_rotary_factor=51 / 128), "partial_rotary_factor=0.3984375"),  # 51 dims
    ("minimax_m2", dict(attn_type_list=[0, 1] * 31), "attn_type_list="),
    ("minimax_m2", dict(qk_norm_type="per_head"), "qk_norm_type='per_head'"),
    ("minimax_m2", dict(scoring_func="softmax"), "scoring_func='softmax'"),
    ("minimax_m2", dict(quantization_config={"quant_method": "awq", "bits": 4}), "quant_method='awq'"),
    ("minimax_m2", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling 'yarn'"),
])
def test_unsupported_fields_are_one_line_errors_naming_the_field(family, change, needle):
    d = {**PUBLISHED[{"mixtral": "mixtral-8x7b", "olmoe": "olmoe-1b-7b", "qwen2_moe": "qwen1.5-moe-a2.7b",
                      "phimoe": "phi-3.5-moe", "gpt_oss": "gpt-oss-20b", "deepseek_v3": "deepseek-v3",
                      "glm4_moe": "glm-4.5-air", "minimax_m2": "minimax-m2"}[family]],
         **change}
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        registry.adapter_for(d).config_from_hf(d)
    assert needle in str(e.value) and "\n" not in str(e.value)


# Each family's published config.json (`io.preset` writes them out) and every key of it the
# decoder reads, as the checkpoint spells it (dotted: inside an object), with its kind.
RELEASES = {"qwen3_moe": "qwen3-30b-a3b", "mixtral": "mixtral-8x7b", "olmoe": "olmoe-1b-7b",
            "qwen2_moe": "qwen1.5-moe-a2.7b", "phimoe": "phi-3.5-moe", "gpt_oss": "gpt-oss-20b",
            "qwen3_next": "qwen3-next-80b-a3b", "deepseek_v3": "deepseek-v3", "glm4_moe": "glm-4.5-air",
            "minimax_m2": "minimax-m2", "qwen3_5_moe": "qwen3.5-35b-a3b"}
SHARED_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "max_position_embeddings", "num_experts_per_tok")
SHARED_FLOATS = ("rms_norm_eps",)
READ = {  # family -> (integer keys, number keys) beyond the shared ones
    "qwen3_moe": (("head_dim", "num_experts", "moe_intermediate_size", "intermediate_size", "decoder_sparse_step"),
                  ("rope_theta",)),
    "mixtral": (("num_local_experts", "intermediate_size"), ("rope_theta",)),
    "olmoe": (("num_experts", "intermediate_size"), ("rope_theta", "clip_qkv")),
    "qwen2_moe": (("num_experts", "moe_intermediate_size", "intermediate_size", "shared_expert_intermediate_size",
                   "decoder_sparse_step"), ("rope_theta",)),
    "phimoe": (("num_local_experts", "intermediate_size", "rope_scaling.original_max_position_embeddings"),
               ("rope_theta", "router_jitter_noise", "rope_scaling.short_mscale", "rope_scaling.long_mscale")),
    "gpt_oss": (("head_dim", "num_local_experts", "intermediate_size", "sliding_window",
                 "rope_scaling.original_max_position_embeddings"),
                ("rope_theta", "swiglu_limit", "rope_scaling.factor", "rope_scaling.beta_fast")),
    "qwen3_next": (("head_dim", "num_experts", "moe_intermediate_size", "intermediate_size",
                    "shared_expert_intermediate_size", "linear_conv_kernel_dim", "linear_key_head_dim",
                    "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
                    "full_attention_interval", "decoder_sparse_step"), ("rope_theta", "partial_rotary_factor")),
    "deepseek_v3": (("n_routed_experts", "moe_intermediate_size", "intermediate_size", "kv_lora_rank", "q_lora_rank",
                     "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "n_group", "topk_group",
                     "first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers",
                     "rope_scaling.original_max_position_embeddings"),
                    ("rope_theta", "routed_scaling_factor", "rope_scaling.factor", "rope_scaling.mscale_all_dim",
                     "rope_scaling.mscale")),
    "glm4_moe": (("head_dim", "n_routed_experts", "moe_intermediate_size", "intermediate_size", "n_group",
                  "topk_group", "first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"),
                 ("rope_theta", "partial_rotary_factor", "routed_scaling_factor")),
    "minimax_m2": (("head_dim", "num_local_experts", "intermediate_size", "rotary_dim"), ("rope_theta",)),
    "qwen3_5_moe": (tuple(f"text_config.{k}" for k in (
        *SHARED_INTS, "head_dim", "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
        "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
        "linear_num_value_heads")), tuple(f"text_config.{k}" for k in (
            *SHARED_FLOATS, "rope_parameters.rope_theta", "rope_parameters.partial_rotary_factor"))),
}
# Past either end of any range, or not a number of the key's kind.
HOSTILE = {"int": (-1, 10**12, 1.5, "7", True), "number": (-1, 1e39, float("inf"), "7", False)}


def with_value(d: dict, key: str, value) -> dict:
    d = json.loads(json.dumps(d))  # a deep copy
    *parents, leaf = key.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[leaf] = value
    return d


def refusal(d: dict) -> str:
    with pytest.raises(ConfigError) as e:
        registry.adapter_for(d).config_from_hf(d)
    return str(e.value)


@pytest.mark.parametrize("family", sorted(RELEASES))
def test_every_value_the_decoder_reads_is_refused_past_either_bound_naming_its_key(family):
    import re

    d = preset.PRESETS[RELEASES[family]]
    registry.adapter_for(d).config_from_hf(d)  # as released: within every bound
    ints, numbers = READ[family]
    if family != "qwen3_5_moe":  # DeepSeek-V3's latent attention gives every head its keys: no key heads read
        shared = tuple(k for k in SHARED_INTS if not (family == "deepseek_v3" and k == "num_key_value_heads"))
        ints, numbers = shared + ints, SHARED_FLOATS + numbers
    for kind, keys in (("int", ints), ("number", numbers)):
        for key in keys:
            for value in HOSTILE[kind]:
                message = refusal(with_value(d, key, value))
                leaf = key.split(".")[-1]
                assert re.search(rf"(^|[ .']){leaf}=", message) and "\n" not in message, (key, value, message)


@pytest.mark.parametrize("family, change, needle", [
    ("qwen3_next", {"partial_rotary_factor": 1.5}, "partial_rotary_factor=1.5"),
    ("glm4_moe", {"partial_rotary_factor": 0.001}, "partial_rotary_factor=0.001"),
    ("qwen3_5_moe", {"text_config.rope_parameters.partial_rotary_factor": 2.0},
     "text_config.rope_parameters.partial_rotary_factor=2.0"),
    ("gpt_oss", {"sliding_window": 10**7}, "sliding_window=10000000"),  # past max_position_embeddings
    ("qwen3_moe", {"rms_norm_eps": 2.0}, "rms_norm_eps=2.0"),
    ("phimoe", {"router_jitter_noise": 3.0}, "router_jitter_noise=3.0"),
    ("gpt_oss", {"rope_scaling.beta_slow": 64.0}, "rope_scaling.beta_slow=64.0"),  # above beta_fast
    ("gpt_oss", {"rope_scaling.original_max_position_embeddings": 10**6},
     "rope_scaling.original_max_position_embeddings=1000000"),  # past max_position_embeddings
    ("mixtral", {"num_key_value_heads": 64}, "num_key_value_heads=64"),  # above the query heads
    ("mixtral", {"num_attention_heads": 4095}, "num_attention_heads=4095"),  # no even head dim
    ("qwen3_next", {"linear_num_value_heads": 24}, "linear_num_value_heads=24"),  # not a multiple of the key heads
    ("qwen3_next", {"full_attention_interval": 49, "layer_types": None}, "full_attention_interval=49"),
    ("qwen3_moe", {"decoder_sparse_step": 49}, "decoder_sparse_step=49"),  # past num_hidden_layers
    ("deepseek_v3", {"first_k_dense_replace": 62}, "first_k_dense_replace=62"),
    ("deepseek_v3", {"n_shared_experts": 1000}, "n_shared_experts=1000"),
    ("deepseek_v3", {"topk_group": 9}, "topk_group=9"),
    ("deepseek_v3", {"qk_rope_head_dim": 63}, "qk_rope_head_dim=63"),
    ("minimax_m2", {"rotary_dim": 63}, "rotary_dim=63"),
    ("minimax_m2", {"rotary_dim": 256}, "rotary_dim=256"),  # past head_dim
    ("phimoe", {"rope_scaling.short_factor": [0.0] * 64}, "rope_scaling.short_factor=[0.0"),
    ("phimoe", {"rope_scaling.long_factor": [1.0] * 7}, "rope_scaling.long_factor=[1.0"),
    ("olmoe", {"num_experts_per_tok": 65}, "num_experts_per_tok=65"),
    ("qwen3_5_moe", {"text_config.num_experts_per_tok": 257}, "text_config.num_experts_per_tok=257"),
])
def test_a_value_out_of_the_range_other_fields_give_it_names_its_key(family, change, needle):
    d = preset.PRESETS[RELEASES[family]]
    for key, value in change.items():
        d = with_value(d, key, value)
    d = {k: v for k, v in d.items() if v is not None}
    message = refusal(d)
    assert needle in message and "\n" not in message, message


def test_the_registry_refuses_an_incomplete_adapter_and_a_second_one_for_a_model_type():
    import types

    from dynaexq_jax.models import mixtral

    incomplete = types.ModuleType("half_family")
    incomplete.MODEL_TYPE, incomplete.config_from_hf = "half", mixtral.config_from_hf
    missing = "expert_tensors, config_to_hf, top_tensors, layer_tensors, fused_expert_tensors"
    with pytest.raises(TypeError, match=f"half_family lacks {missing}"):
        registry.register(incomplete)
    twin = types.ModuleType("twin")
    twin.__dict__.update({m: getattr(mixtral, m) for m in registry.MEMBERS})
    with pytest.raises(TypeError, match="two family adapters for model_type 'mixtral'"):
        registry.register(mixtral, twin)
    assert registry.register(twin) == {"mixtral": twin}


# ----------------------------------------------------------------- the published models

# The config.json of each published checkpoint (the fields that matter, as on the Hub), and its
# published parameter count.
PUBLISHED = {
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
        "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu",
        "router_aux_loss_coef": 0.02, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    },
    "olmoe-1b-7b": {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048,
        "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "clip_qkv": None,
        "attention_bias": False, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "rope_scaling": None, "tie_word_embeddings": False, "hidden_act": "silu", "eos_token_id": 50279,
        "pad_token_id": 1, "torch_dtype": "bfloat16",
    },
    "qwen1.5-moe-a2.7b": {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "norm_topk_prob": False, "decoder_sparse_step": 1,
        "max_position_embeddings": 8192, "max_window_layers": 21, "rms_norm_eps": 1e-06, "rope_theta": 1e6,
        "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
    },
    "phi-3.5-moe": {
        "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "vocab_size": 32064, "hidden_size": 4096,
        "intermediate_size": 6400, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 16, "num_experts_per_tok": 2, "attention_bias": True, "lm_head_bias": True,
        "router_jitter_noise": 0.01, "input_jitter_noise": 0.01, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "sliding_window": 131072, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1,
        "eos_token_id": 32000, "torch_dtype": "bfloat16",
        # The release's 64 short and 64 long factors are stand-ins here: they change no count and no plan.
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 64, "long_factor": [1.0] * 64,
                         "short_mscale": 1.243163121016122, "long_mscale": 1.243163121016122,
                         "original_max_position_embeddings": 4096},
    },
}
PUBLISHED["gpt-oss-20b"] = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "head_dim": 64, "num_hidden_layers": 24, "num_attention_heads": 64,
    "num_key_value_heads": 8, "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4,
    "attention_bias": True, "attention_dropout": 0.0, "hidden_act": "silu", "initial_context_length": 4096,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "sliding_window": 128, "swiglu_limit": 7.0,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 150000, "router_aux_loss_coef": 0.9,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "tie_word_embeddings": False, "eos_token_id": 200002, "pad_token_id": 199999, "use_cache": True,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
}
PUBLISHED["gpt-oss-120b"] = {**PUBLISHED["gpt-oss-20b"], "num_hidden_layers": 36, "num_local_experts": 128,
                             "layer_types": ["sliding_attention", "full_attention"] * 18}
# The families added since, from `io.preset` (where each config.json is written out).
PUBLISHED.update({"deepseek-v3": preset.DEEPSEEK_V3, "glm-4.5-air": preset.GLM_4_5_AIR,
                  "minimax-m2": preset.MINIMAX_M2})
PUBLISHED_PARAMS = {"mixtral-8x7b": 46.7e9, "olmoe-1b-7b": 6.9e9, "qwen1.5-moe-a2.7b": 14.3e9, "phi-3.5-moe": 41.9e9,
                    "gpt-oss-20b": 20.9e9, "gpt-oss-120b": 116.8e9,
                    # DeepSeek-V3's model card: 671B (its 685B checkpoint adds the 14B multi-token-prediction module)
                    "deepseek-v3": 671.0e9}
# Published only to the billion: zai-org's "106B total" for GLM-4.5-Air (106.85B without its
# multi-token-prediction layer) and MiniMax's "230B total" for MiniMax-M2 (228.69B): within 1%.
PUBLISHED_ROUNDED = {"glm-4.5-air": 106e9, "minimax-m2": 230e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_count_their_published_parameters(name):
    d = PUBLISHED[name]
    cfg = registry.adapter_for(d).config_from_hf(d)
    if name in PUBLISHED_ROUNDED:
        assert abs(budget.parameter_count(cfg) / PUBLISHED_ROUNDED[name] - 1) < 0.01
    else:
        assert round(budget.parameter_count(cfg) / 1e9, 1) == PUBLISHED_PARAMS[name] / 1e9


@pytest.mark.parametrize("name", ["deepseek-v3", "glm-4.5-air", "minimax-m2"])
def test_published_configs_count_what_transformers_builds_from_them(name):
    """The count against transformers' own model of the published config, built on the meta
    device (no memory), every saved tensor counted (the routers' correction biases too)."""
    import transformers

    d = {k: v for k, v in PUBLISHED[name].items() if k != "quantization_config"}
    cfg = registry.adapter_for(d).config_from_hf(d)
    hf_cfg = transformers.AutoConfig.for_model(**d)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert budget.parameter_count(cfg) == sum(t.numel() for t in hf.state_dict().values())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_dry_run_plans_the_published_configs(name, tmp_path, capsys):
    generate = _generate_script()
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    code = generate.main(["--model", str(tmp_path), "--dry-run", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    plan = json.loads(out)["memory_plan"]
    d = PUBLISHED[name]
    cfg = registry.adapter_for(d).config_from_hf(d)
    assert plan["weights"] == budget.non_expert_nbytes(cfg, 2)
    assert plan["num_experts_total"] == len(cfg.moe_layers) * cfg.num_experts


def test_dry_run_plans_gpt_oss_with_its_shipped_mxfp4_fallback(tmp_path, capsys):
    generate = _generate_script()
    d = PUBLISHED["gpt-oss-20b"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    code = generate.main(["--model", str(tmp_path), "--dry-run", "--json", "--policy", "static", "--lo-bits", "mxfp4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    plan = json.loads(out)["memory_plan"]
    cfg = registry.adapter_for(d).config_from_hf(d)
    values = len(cfg.moe_layers) * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert plan["lo_bits"] == "mxfp4" and plan["fallback"] * 8 == values * 4.25  # 10.15 GB


# ----------------------------------------------------------------- gpt-oss's MXFP4 experts


def _e2m1_64(codes: np.ndarray) -> np.ndarray:
    """float64 value of each 4-bit e2m1 code from its bits: sign, 2 exponent bits, 1 mantissa bit."""
    sign = np.where(codes & 8, -1.0, 1.0)
    exp, man = (codes >> 1) & 3, (codes & 1).astype(np.float64)
    return sign * np.where(exp == 0, man / 2, (1 + man / 2) * 2.0 ** (exp.astype(np.float64) - 1))


def _mxfp4_reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float64 [..., K, N] of MXFP4 blocks [..., N, G, 16] and scales [..., N, G], byte by byte."""
    *lead, n, g, b = blocks.shape
    out = np.empty((*lead, n, g * 2 * b))
    for j in range(b):
        for nibble, codes in ((0, blocks[..., j] & 0x0F), (1, blocks[..., j] >> 4)):
            out[..., 2 * j + nibble::2 * b] = _e2m1_64(codes) * 2.0 ** (scales.astype(np.float64) - 127)
    return np.swapaxes(out, -1, -2)


def to_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [..., K, N] (K a multiple of 32) -> MXFP4 blocks [..., N, K/32, 16], scales [..., N, K/32]:
    per 32 values along K the smallest power of two that brings them within e2m1's +-6, each
    rounded to the nearest e2m1 value (transformers' integrations/mxfp4.py layout)."""
    wt = np.swapaxes(np.asarray(w, np.float64), -1, -2)
    groups = wt.reshape(*wt.shape[:-1], wt.shape[-1] // 32, 32)  # [..., N, G, 32]
    amax = np.abs(groups).max(-1)
    exp = np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)).clip(-127, 127)
    table = _e2m1_64(np.arange(16))
    codes = np.abs(groups[..., None] / 2.0 ** exp[..., None, None] - table).argmin(-1).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    # contiguous: safetensors' numpy writer copies the raw buffer, whatever the strides
    return np.ascontiguousarray(blocks), np.ascontiguousarray((exp + 127).astype(np.uint8))


def test_mxfp4_decoding_matches_float64_and_transformers():
    """Every code in both nibbles, exponents around 2**0, against the bit-level float64 rule and
    transformers' own dequantization."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 5, 2, 16), dtype=np.uint8)
    scales = rng.integers(120, 135, (3, 5, 2), dtype=np.uint8)
    ours = loader.decode_mxfp4(blocks, scales)  # [3, 64, 5]
    assert ours.dtype == np.float32 and ours.shape == (3, 64, 5)
    np.testing.assert_array_equal(ours, _mxfp4_reference(blocks, scales))
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    np.testing.assert_array_equal(ours, theirs.numpy())


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    """The first gpt-oss configuration with its experts as MXFP4 blocks and scales (the way the
    releases ship them), and transformers' model on the decoded weights."""
    from safetensors.numpy import load_file, save_file

    _, _, src, hf = checkpoint(tmp_path_factory, "gpt_oss", "yarn-window-untied")
    path = tmp_path_factory.mktemp("hf-gpt_oss-mxfp4")
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[name + "_blocks"], tensors[name + "_scales"] = to_mxfp4(tensors.pop(name))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    import copy

    decoded = copy.deepcopy(hf)
    with torch.no_grad():
        for i, layer in enumerate(decoded.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                name = f"model.layers.{i}.mlp.experts.{proj}"
                ref = _mxfp4_reference(tensors[name + "_blocks"], tensors[name + "_scales"])
                getattr(layer.mlp.experts, proj).copy_(torch.from_numpy(ref.astype(np.float32)))
    return path, decoded


def test_mxfp4_experts_load_as_their_decoded_weights(mxfp4_checkpoint):
    path, decoded = mxfp4_checkpoint
    ckpt = loader.load(path, jnp.float32)
    I = ckpt.config.moe_intermediate_size
    for m, layer in enumerate(decoded.model.layers):
        gu = layer.mlp.experts.gate_up_proj.detach().numpy()  # [E, H, 2I], gate|up interleaved
        np.testing.assert_array_equal(ckpt.experts.gate_up[m][..., :I], gu[..., 0::2])
        np.testing.assert_array_equal(ckpt.experts.gate_up[m][..., I:], gu[..., 1::2])
        np.testing.assert_array_equal(ckpt.experts.down[m], layer.mlp.experts.down_proj.detach().numpy())


def test_mxfp4_checkpoint_matches_transformers_on_the_decoded_weights(mxfp4_checkpoint):
    path, decoded = mxfp4_checkpoint
    eng = engine.Engine(loader.load(path, jnp.float32))
    for ids, lg in zip(PROMPTS, eng.logits(PROMPTS)):
        with torch.no_grad():
            ref = decoded(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(lg, ref, atol=1e-4, rtol=0)
    assert eng.generate(PROMPTS, max_new_tokens=12, eos_token_ids=()).tokens == hf_generate(decoded, PROMPTS, 12)


def test_mxfp4_blocks_of_the_wrong_shape_are_one_line_errors(mxfp4_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = mxfp4_checkpoint
    for f in ("config.json", "tokenizer.json"):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj_scales"  # [E, 2I, H/32 = 2]
    tensors[name] = np.ascontiguousarray(tensors[name][:, :, :1])  # a scale short per row
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(loader.CheckpointError) as e:
        loader.load(tmp_path, jnp.float32)
    assert "MXFP4 tensor 'model.layers.0.mlp.experts.gate_up_proj'" in str(e.value) and "\n" not in str(e.value)


def _checkpoint_expert_bytes(path):
    """{tensor name: (blocks, scales)} of an MXFP4 checkpoint's experts, as stored."""
    from safetensors.numpy import load_file

    t = load_file(path / "model.safetensors")
    return {n[: -len("_blocks")]: (t[n], t[n[: -len("_blocks")] + "_scales"]) for n in t if n.endswith("_blocks")}


@pytest.mark.parametrize("policy", ["static", "dynaexq"])
def test_mxfp4_fallback_is_the_checkpoint_bytes_and_serves_the_decoded_model(mxfp4_checkpoint, policy):
    """An MXFP4 fallback of an MXFP4 checkpoint holds exactly its blocks and scales (gate_up's
    rows de-interleaved: whole rows moved, none re-encoded), the plan counts exactly those bytes,
    and the model it serves is the decoded one that `full` runs (dynaexq with no slots: every
    expert served by the fallback)."""
    path, _ = mxfp4_checkpoint
    ckpt = loader.load(path, jnp.float32)
    opts = dynaexq.DynaExqOptions(lo_bits="mxfp4", hi_dtype="bfloat16", max_slots=0)
    eng, plan = build_engine(ckpt, policy, budget=None, batch=2, longest_prompt=len(PROMPT), max_new_tokens=16,
                             opts=opts)
    (tier,) = eng.policy.experts.tiers
    assert isinstance(tier.gate_up, quant.Mxfp4Tensor) and isinstance(tier.down, quant.Mxfp4Tensor)
    stored = _checkpoint_expert_bytes(path)
    cfg = ckpt.config
    E, two_i = cfg.num_experts, 2 * cfg.moe_intermediate_size
    gate_then_up = np.concatenate([np.arange(0, two_i, 2), np.arange(1, two_i, 2)])
    for m in range(len(cfg.moe_layers)):
        rows = slice(m * E, (m + 1) * E)
        for piece, perm in (("gate_up_proj", gate_then_up), ("down_proj", slice(None))):
            blocks, scales = stored[f"model.layers.{m}.mlp.experts.{piece}"]
            w = getattr(tier, piece[: -len("_proj")])
            np.testing.assert_array_equal(np.asarray(w.blocks[rows]), blocks[:, perm].reshape(w.blocks[rows].shape))
            np.testing.assert_array_equal(np.asarray(w.scales[rows]), scales[:, perm])
    assert plan.fallback == tier.nbytes == sum(b.nbytes + s.nbytes for b, s in stored.values())
    assert plan.lo_bits == "mxfp4" and eng.policy.experts.tiers[0].nbytes * 8 == 4.25 * sum(
        b.size * 2 for b, _ in stored.values())
    full, _ = build_engine(loader.load(path, jnp.float32), "full", budget=None, batch=2, longest_prompt=len(PROMPT),
                           max_new_tokens=16)
    batch = [PROMPT, PROMPT[::-1][:5]]
    for ours, theirs in zip(eng.logits(batch), full.logits(batch)):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert eng.generate(batch, 8, eos_token_ids=()).tokens == full.generate(batch, 8, eos_token_ids=()).tokens


def test_mxfp4_fallback_of_a_float_checkpoint_is_quantized_and_equals_its_dequantized_reference(tmp_path_factory):
    from test_runtime import forward_fn, reference_state

    _, _, path, _ = checkpoint(tmp_path_factory, "gpt_oss", "yarn-window-untied")
    eng, plan = build(path, "static", opts=dynaexq.DynaExqOptions(lo_bits="mxfp4"))
    experts = eng.policy.experts
    assert isinstance(experts.tiers[0].gate_up, quant.Mxfp4Tensor) and plan.fallback == experts.tiers[0].nbytes
    ckpt = eng.checkpoint
    fwd = forward_fn(ckpt.config)
    tokens = jnp.asarray([PROMPT, PROMPT[::-1]])
    ref = reference_state(experts, ckpt.experts.gate_up, ckpt.experts.down)
    np.testing.assert_allclose(fwd(ckpt.params, experts, tokens), fwd(ckpt.params, ref, tokens), atol=1e-4, rtol=0)


def test_dynaexq_over_an_mxfp4_fallback_promotes_into_bf16_slots_within_a_budget(mxfp4_checkpoint):
    """--lo-bits mxfp4 with the default --hi-dtype auto: bf16 slots (auto tiers weigh integer
    widths only), as many as the budget leaves after the MXFP4 fallback; promotions decode the
    checkpoint's blocks into the slots."""
    from dynaexq_jax.runtime.build import plan_for

    path, _ = mxfp4_checkpoint
    ckpt = loader.load(path, jnp.float32)
    opts = dynaexq.DynaExqOptions(lo_bits="mxfp4", rebalance_every=1)
    shape = dict(batch=1, longest_prompt=len(PROMPT), max_new_tokens=8)
    concrete = dataclasses.replace(opts, hi_dtype="bfloat16")
    base = plan_for(ckpt.config, "dynaexq", budget=None, dtype_itemsize=4, opts=concrete, **shape)
    eng, plan = build_engine(ckpt, "dynaexq", budget=base.budget_for(2), opts=opts, **shape)
    lo, slots = eng.policy.experts.tiers
    assert plan.slots == 2 and isinstance(lo.gate_up, quant.Mxfp4Tensor) and slots.gate_up.dtype == jnp.float32
    g = eng.generate([PROMPT], 8, eos_token_ids=())
    assert len(g.tokens[0]) == 8 and g.stats["promotions"] > 0


def test_auto_tiers_serve_an_mxfp4_checkpoint_as_it_ships_where_it_fits(mxfp4_checkpoint):
    """The defaults (--lo-bits auto) keep the shipped MXFP4 blocks as the fallback, not an int4
    requantization of them; under MXFP4's minimum the integer widths are chosen instead."""
    from dynaexq_jax.runtime.build import auto_tiers, plan_for

    path, _ = mxfp4_checkpoint
    ckpt = loader.load(path, jnp.float32)
    shape = dict(batch=1, longest_prompt=len(PROMPT), max_new_tokens=8)
    mx = plan_for(ckpt.config, "dynaexq", budget=None, dtype_itemsize=4,
                  opts=dynaexq.DynaExqOptions(lo_bits="mxfp4", hi_dtype="bfloat16"), **shape)
    auto = dynaexq.DynaExqOptions(lo_bits="auto", hi_dtype="auto")  # generate.py's defaults
    opts, _ = auto_tiers(ckpt, auto, budget=mx.budget_for(2), **shape)
    assert (opts.lo_bits, opts.hi_dtype) == ("mxfp4", "bfloat16")
    opts, choice = auto_tiers(ckpt, auto, budget=mx.minimum - 1, **shape)
    assert opts.lo_bits in (3, 2) and choice is not None


def test_mxfp4_scales_beyond_the_compute_dtype_are_one_line_errors(mxfp4_checkpoint, tmp_path):
    """A scale byte of 255 (e8m0's NaN) would decode to Inf or NaN: refused from the scales alone,
    before any expert is decoded."""
    from safetensors.numpy import load_file, save_file

    path, _ = mxfp4_checkpoint
    for f in ("config.json", "tokenizer.json"):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj_scales"
    tensors[name][0, 0, 0] = 255
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(loader.CheckpointError, match="too large for float32") as e:
        loader.load(tmp_path, jnp.float32)
    assert "model.layers.1.mlp.experts.down_proj" in str(e.value) and "\n" not in str(e.value)
