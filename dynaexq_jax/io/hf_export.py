"""Write a Hugging Face-format Qwen3-MoE checkpoint directory, atomically.

The inverse of `loader.load_params`: Flax kernels [in, out] go back to HF's [out, in] layout,
each MoE layer's stacked experts are split into `mlp.experts.{j}.{gate,up,down}_proj.weight`.
Everything is written into a temporary directory beside the target and renamed into place
only when complete, so a failure midway never leaves a half-written checkpoint at `path`
(and an existing checkpoint there stays intact until the new one is whole).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors.numpy import save_file

from dynaexq_jax.models.config import Qwen3MoeConfig
from dynaexq_jax.experts.expert_state import DenseExperts
from dynaexq_jax.io.loader import np_dtype

_DTYPE_NAMES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


def hf_tensors(cfg: Qwen3MoeConfig, params: dict, experts: DenseExperts, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF tensor name, host array in HF layout and `dtype`) for every weight of the model."""
    npd = np_dtype(dtype)
    H, D = cfg.hidden_size, cfg.head_dim
    I = cfg.moe_intermediate_size

    def arr(x, shape):
        a = np.asarray(x).astype(npd)
        if a.shape != shape:
            raise ValueError(f"expected shape {shape}, got {a.shape}")
        return np.ascontiguousarray(a)

    def linear(p, in_dim, out_dim):  # Flax [in, out] -> HF [out, in]
        return arr(np.asarray(p["kernel"]), (in_dim, out_dim)).T.copy()

    yield "model.embed_tokens.weight", arr(params["embed_tokens"]["embedding"], (cfg.vocab_size, H))
    for i in range(cfg.num_layers):
        p, layer = f"model.layers.{i}.", params[f"layers_{i}"]
        attn = layer["self_attn"]
        yield p + "input_layernorm.weight", arr(layer["input_layernorm"]["weight"], (H,))
        yield p + "post_attention_layernorm.weight", arr(layer["post_attention_layernorm"]["weight"], (H,))
        yield p + "self_attn.q_proj.weight", linear(attn["q_proj"], H, cfg.num_heads * D)
        yield p + "self_attn.k_proj.weight", linear(attn["k_proj"], H, cfg.num_kv_heads * D)
        yield p + "self_attn.v_proj.weight", linear(attn["v_proj"], H, cfg.num_kv_heads * D)
        yield p + "self_attn.o_proj.weight", linear(attn["o_proj"], cfg.num_heads * D, H)
        yield p + "self_attn.q_norm.weight", arr(attn["q_norm"]["weight"], (D,))
        yield p + "self_attn.k_norm.weight", arr(attn["k_norm"]["weight"], (D,))
        if cfg.is_moe_layer(i):
            m = cfg.moe_layers.index(i)
            yield p + "mlp.gate.weight", linear(layer["mlp"]["gate"], H, cfg.num_experts)
            wgu = arr(experts.gate_up[m], (cfg.num_experts, H, 2 * I))
            wd = arr(experts.down[m], (cfg.num_experts, I, H))
            for e in range(cfg.num_experts):
                q = f"{p}mlp.experts.{e}."
                yield q + "gate_proj.weight", np.ascontiguousarray(wgu[e, :, :I].T)
                yield q + "up_proj.weight", np.ascontiguousarray(wgu[e, :, I:].T)
                yield q + "down_proj.weight", np.ascontiguousarray(wd[e].T)
        else:
            F, mlp = cfg.intermediate_size, layer["mlp"]
            yield p + "mlp.gate_proj.weight", linear(mlp["gate_proj"], H, F)
            yield p + "mlp.up_proj.weight", linear(mlp["up_proj"], H, F)
            yield p + "mlp.down_proj.weight", linear(mlp["down_proj"], F, H)
    yield "model.norm.weight", arr(params["norm"]["weight"], (H,))
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", linear(params["lm_head"], H, cfg.vocab_size)


def _write(path: Path, data: str | bytes):
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    path: str | Path,
    cfg: Qwen3MoeConfig,
    params: dict,
    experts: DenseExperts,
    *,
    tokenizer=None,
    eos_token_id: int | list[int] | None = None,
    dtype="bfloat16",
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write `path/` = config.json, generation_config.json, model.safetensors[, tokenizer.json].

    `tokenizer` is a `tokenizers.Tokenizer` (or anything with `.to_str()`), `extra_files`
    maps further file names to their contents (e.g. training metrics), written in the same
    atomic step. Returns the checkpoint path.
    """
    path = Path(path).absolute()
    dtype_name = _DTYPE_NAMES[str(np.dtype(np_dtype(dtype)))]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        tensors = dict(hf_tensors(cfg, params, experts, dtype_name))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        with open(tmp / "model.safetensors", "rb+") as f:
            os.fsync(f.fileno())
        del tensors

        config = cfg.to_hf_dict()
        config["torch_dtype"] = dtype_name
        config["dtype"] = dtype_name
        gen = {"_from_model_config": True}
        if eos_token_id is not None:
            config["eos_token_id"] = eos_token_id
            gen["eos_token_id"] = eos_token_id
        _write(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        _write(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            _write(tmp / "tokenizer.json", tokenizer.to_str())
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_position_embeddings}
            if eos_token_id is not None and hasattr(tokenizer, "id_to_token"):
                eos_ids = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
                tok_cfg["eos_token"] = tokenizer.id_to_token(eos_ids[0])
                tok_cfg["pad_token"] = tok_cfg["eos_token"]
            _write(tmp / "tokenizer_config.json", json.dumps(tok_cfg, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            if Path(name).name != name:
                raise ValueError(f"extra file name {name!r} must be a plain file name")
            _write(tmp / name, data)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)

        # Swap into place: move an existing checkpoint aside first (a directory cannot be
        # renamed over a non-empty one), then drop it once the new one is in place.
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / "ckpt")
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old / "ckpt", path)  # put the previous checkpoint back
            raise
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


__all__ = ["hf_tensors", "save_checkpoint"]
