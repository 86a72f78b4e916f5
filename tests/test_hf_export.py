"""hf_export: exact round trip through loader.load, transformers loads it and agrees, atomicity."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dynaexq_jax import train
from dynaexq_jax.io import hf_export, loader
from dynaexq_jax.models.config import ModelConfig
from dynaexq_jax.runtime.engine import Engine

SHAPES = {
    "moe": dict(num_layers=2, num_experts=8, experts_per_token=2, norm_topk_prob=True,
                tie_word_embeddings=False, mlp_only_layers=()),
    "mixed": dict(num_layers=3, num_experts=6, experts_per_token=3, norm_topk_prob=False,
                  tie_word_embeddings=True, mlp_only_layers=(0,)),
}


def tiny_cfg(name="moe") -> ModelConfig:
    return ModelConfig(
        vocab_size=96, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16,
        moe_intermediate_size=16, intermediate_size=48, rope_theta=10000.0,
        max_position_embeddings=256, **SHAPES[name],
    )


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 10, trainer)
    return tok


def init_params(cfg, seed, std=train.INIT_STD):
    """Trained-model params and its experts as the exporter takes them (host, per MoE layer)."""
    params, experts = train.init_params(cfg, seed, std)
    return params, train.host_experts(experts)


def leaves_with_paths(tree):
    return {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_exact(tmp_path, name, dtype):
    cfg = tiny_cfg(name)
    params, experts = init_params(cfg, seed=1, std=0.3)
    tok = tiny_tokenizer()
    out = hf_export.save_checkpoint(tmp_path / "ckpt", cfg, params, experts, tokenizer=tok,
                                    eos_token_id=0, dtype=dtype)
    ck = loader.load(out, dtype=jnp.dtype(dtype))
    assert ck.config == cfg
    assert ck.eos_token_ids == (0,)
    assert ck.tokenizer.encode("def f(x):").ids == tok.encode("def f(x):").ids
    npd = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    want = leaves_with_paths((params, tuple(experts.gate_up), tuple(experts.down)))
    got = leaves_with_paths((ck.params, tuple(ck.experts.gate_up), tuple(ck.experts.down)))
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == npd, k
        np.testing.assert_array_equal(got[k], want[k].astype(npd), err_msg=k)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == dtype
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_transformers_loads_export_and_logits_agree(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = tiny_cfg(name)
    params, experts = train.init_params(cfg, seed=2, std=0.3)
    out = hf_export.save_checkpoint(tmp_path / "ckpt", cfg, params, train.host_experts(experts), eos_token_id=0,
                                    dtype="float32")
    hf, info = transformers.Qwen3MoeForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    hf.eval()

    ids = np.array([[5, 17, 3, 88, 42, 9, 61, 23, 70, 1, 33, 12]], np.int32)
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()[0]
    assert np.abs(ref).max() > 0.1  # a non-trivial model
    # The model as trained (blocked experts) and as served from the export (the runtime).
    trained, _ = jax.jit(train.forward, static_argnums=0)(train.training_decoder(cfg), params, experts, ids,
                                                          np.ones_like(ids, bool))
    served = Engine(loader.load(out, jnp.float32)).logits([ids[0].tolist()])[0]
    np.testing.assert_allclose(np.asarray(trained)[0], ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(served, ref, atol=1e-4, rtol=0)


def test_failure_midway_leaves_no_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    params, experts = init_params(cfg, seed=3)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        hf_export.save_checkpoint(tmp_path / "ckpt", cfg, params, experts)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp dir is left


def test_failure_keeps_previous_checkpoint_and_success_replaces_it(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    p1, e1 = init_params(cfg, seed=4)
    p2, e2 = init_params(cfg, seed=5)
    target = tmp_path / "ckpt"
    hf_export.save_checkpoint(target, cfg, p1, e1, dtype="float32", extra_files={"note.txt": "first"})
    before = (target / "model.safetensors").read_bytes()

    # Fails after the tensors are written (while writing the config): the old one stays.
    monkeypatch.setattr(hf_export, "_write", lambda *a: (_ for _ in ()).throw(OSError("late failure")))
    with pytest.raises(OSError, match="late failure"):
        hf_export.save_checkpoint(target, cfg, p2, e2, dtype="float32")
    monkeypatch.undo()
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ckpt"]

    hf_export.save_checkpoint(target, cfg, p2, e2, dtype="float32")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ckpt"]
    assert not (target / "note.txt").exists()  # replaced whole, not merged
    ck = loader.load(target, jnp.float32)
    np.testing.assert_array_equal(np.asarray(ck.experts.down[0]), np.asarray(e2.down[0]))
