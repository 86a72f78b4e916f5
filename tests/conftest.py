"""Tiny real Qwen3-MoE checkpoints written by transformers' own `save_pretrained`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Converted-expert caches would land inside the test checkpoints; tests of the cache opt in.
os.environ["DYNAEXQ_CACHE"] = "0"
# Likewise JAX's compilation cache, which scripts' main() turns on: tests of it choose a directory.
os.environ["DYNAEXQ_COMPILE_CACHE"] = "0"
# XLA's CPU compiler at its lowest effort (LLVM -O0, no expensive passes), for this process and the
# tools the tests start: two thirds of the suite's time is compiling tiny models, whose steps then run
# in microseconds either way. The optimized HLO and its buffers are the ones users get (only LLVM's
# code generation differs); the GPU compiles of tests/test_aot.py are made without it.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

VOCAB = 300
ROOT = Path(__file__).resolve().parent.parent


def script(name: str):
    """scripts/NAME.py as a module: a tool of the project (a benchmark, calibrate.py), not one of
    the package's commands (those are `dynaexq_jax.cli`), loaded from its file under the name
    `NAME_script`, so scripts/ never goes on sys.path (where lm_eval.py would shadow lm-eval)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# Two shapes the model must get right: a plain MoE stack, and one with a dense layer,
# unnormalised top-k weights, tied embeddings and a sparse step.
CONFIGS = {
    "moe": dict(
        num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        tie_word_embeddings=False, mlp_only_layers=[],
    ),
    "mixed": dict(
        num_hidden_layers=4, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
        tie_word_embeddings=True, mlp_only_layers=[0], decoder_sparse_step=1,
    ),
}


def write_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "the quick brown fox"] * 20, trainer)
    tok.save(str(path / "tokenizer.json"))


def make_hf_checkpoint(path, name, *, seed=0, max_shard_size=None, **overrides):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rope_theta=10000.0, initializer_range=0.3, eos_token_id=0,
    )
    kw.update(CONFIGS[name])
    kw.update(overrides)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw)).eval()
    save_kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **save_kw)
    write_tokenizer(path)
    return model


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    """(directory, transformers model) for each tiny config, float32."""
    path = tmp_path_factory.mktemp(f"hf-{request.param}")
    return path, make_hf_checkpoint(path, request.param)


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-moe-plain")
    return path, make_hf_checkpoint(path, "moe")


@pytest.fixture
def edit_config():
    def edit(path, **changes):
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(changes)
        (path / "config.json").write_text(json.dumps(cfg))

    return edit


SHIPPED = ROOT / "checkpoints" / "tiny-qwen3-moe"
# A ChatML template (Qwen's turn markers, as text: the shipped tokenizer has no such tokens).
CHAT_TEMPLATE = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
                 "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.fixture(scope="session")
def shipped_chat_checkpoint(tmp_path_factory):
    """The shipped tiny model, with a chat template (the servers' tests)."""
    path = tmp_path_factory.mktemp("tiny-chat")
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(SHIPPED / name, path / name)
    config = json.loads((SHIPPED / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=CHAT_TEMPLATE)))
    return path
