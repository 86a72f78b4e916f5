"""Load a Hugging Face Qwen3-MoE checkpoint directory: config, weights, tokenizer.

Tensors are streamed one at a time from the safetensors files (memory-mapped), converted to
the compute dtype and transposed into the Flax layout; each layer's experts are stacked into
one preallocated host array, so host memory peaks near one copy of the model, not two.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from dynaexq_jax.models.config import ConfigError, Qwen3MoeConfig
from dynaexq_jax.errors import UserError
from dynaexq_jax.experts.expert_state import DenseExperts


class CheckpointError(UserError):
    """A checkpoint directory is missing a file or holds tensors this model cannot use."""


_NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}


def np_dtype(dtype) -> np.dtype:
    return np.dtype(_NP_DTYPES.get(str(jnp.dtype(dtype)), dtype))


def weight_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {}
        for name, fname in weight_map.items():
            f = path / fname
            if not f.is_file():
                raise CheckpointError(f"shard {fname} named by {index.name} is missing from {path}")
            files[name] = f
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"{path} has neither model.safetensors nor model.safetensors.index.json; "
            "point --model at a Hugging Face checkpoint directory"
        )
    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


def stored_nbytes(files: dict[str, Path]) -> int:
    """Bytes of the named tensors as stored, from the safetensors headers (no tensor is read)."""
    total = 0
    for path in set(files.values()):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))  # the format: u64 header length, then a JSON header
            header = json.loads(f.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k in files)
    return total


class _TensorReader:
    """Reads named tensors from safetensors files, keeping each file open once; `progress`
    (a tqdm bar, or None) advances by each tensor's stored bytes."""

    def __init__(self, files: dict[str, Path], progress=None):
        self.files = files
        self._open = {}
        self.progress = progress

    def __contains__(self, name):
        return name in self.files

    def get(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.files:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}; is it a complete Qwen3-MoE checkpoint?")
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="numpy")
        t = self._open[path].get_tensor(name)
        if t.shape != shape:
            raise CheckpointError(f"tensor {name!r} has shape {t.shape}, config.json implies {shape}")
        if self.progress is not None:
            self.progress.update(t.nbytes)
        return t.astype(dtype, copy=False)


@dataclasses.dataclass
class Checkpoint:
    """What `load` returns: everything needed to run the model, on the default device."""

    config: Qwen3MoeConfig
    params: dict  # Flax params of everything but the experts
    experts: DenseExperts
    dtype: jnp.dtype
    eos_token_ids: tuple[int, ...]
    tokenizer: object | None  # tokenizers.Tokenizer, when the directory has tokenizer.json
    path: Path


def read_eos(path: Path) -> tuple[int, ...]:
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return ()


def load_tokenizer(path: Path):
    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(f))


def load_params(cfg: Qwen3MoeConfig, files: dict[str, Path], dtype, progress=None) -> tuple[dict, DenseExperts]:
    """Read every tensor into the Flax layout, on the host: (non-expert params, experts)."""
    npd = np_dtype(dtype)
    r = _TensorReader(files, progress)
    H, D = cfg.hidden_size, cfg.head_dim
    E, I = cfg.num_experts, cfg.moe_intermediate_size

    def linear(name, out_dim, in_dim):  # HF stores [out, in]; Flax kernels are [in, out]
        return {"kernel": r.get(name, npd, (out_dim, in_dim)).T}

    def norm(name, dim):
        return {"weight": r.get(name, npd, (dim,))}

    params = {"embed_tokens": {"embedding": r.get("model.embed_tokens.weight", npd, (cfg.vocab_size, H))}}
    gate_up, down = [], []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm": norm(p + "input_layernorm.weight", H),
            "post_attention_layernorm": norm(p + "post_attention_layernorm.weight", H),
            "self_attn": {
                "q_proj": linear(p + "self_attn.q_proj.weight", cfg.num_heads * D, H),
                "k_proj": linear(p + "self_attn.k_proj.weight", cfg.num_kv_heads * D, H),
                "v_proj": linear(p + "self_attn.v_proj.weight", cfg.num_kv_heads * D, H),
                "o_proj": linear(p + "self_attn.o_proj.weight", H, cfg.num_heads * D),
                "q_norm": norm(p + "self_attn.q_norm.weight", D),
                "k_norm": norm(p + "self_attn.k_norm.weight", D),
            },
        }
        if cfg.is_moe_layer(i):
            layer["mlp"] = {"gate": linear(p + "mlp.gate.weight", E, H)}
            wgu = np.empty((E, H, 2 * I), npd)  # [E, H, 2I]: gate columns, then up
            wd = np.empty((E, I, H), npd)  # [E, I, H]
            fused = p + "mlp.experts.gate_up_proj"
            if fused in r:  # transformers' in-memory layout, when saved unconverted
                wgu[:] = r.get(fused, npd, (E, 2 * I, H)).transpose(0, 2, 1)
                wd[:] = r.get(p + "mlp.experts.down_proj", npd, (E, H, I)).transpose(0, 2, 1)
            else:
                for e in range(E):
                    q = f"{p}mlp.experts.{e}."
                    wgu[e, :, :I] = r.get(q + "gate_proj.weight", npd, (I, H)).T
                    wgu[e, :, I:] = r.get(q + "up_proj.weight", npd, (I, H)).T
                    wd[e] = r.get(q + "down_proj.weight", npd, (H, I)).T
            gate_up.append(wgu)
            down.append(wd)
        else:
            F = cfg.intermediate_size
            layer["mlp"] = {
                "gate_proj": linear(p + "mlp.gate_proj.weight", F, H),
                "up_proj": linear(p + "mlp.up_proj.weight", F, H),
                "down_proj": linear(p + "mlp.down_proj.weight", H, F),
            }
        params[f"layers_{i}"] = layer
    params["norm"] = norm("model.norm.weight", H)
    if not cfg.tie_word_embeddings:
        params["lm_head"] = linear("lm_head.weight", cfg.vocab_size, H)
    return params, DenseExperts(gate_up=tuple(gate_up), down=tuple(down))


def to_device(tree):
    """Move a host pytree to the default device leaf by leaf (no second full host copy)."""
    return jax.tree.map(lambda a: jax.device_put(np.ascontiguousarray(a)), tree)


def load(path: str | Path, dtype=jnp.bfloat16, *, experts_on_device: bool = True, progress: bool = False) -> Checkpoint:
    """Load a Hugging Face Qwen3-MoE checkpoint directory onto the default device.

    With `experts_on_device=False` the experts stay in host memory (numpy), for a runtime
    that quantizes them and keeps only some at high precision on the device. `progress`
    shows a bar of bytes read, with rate and ETA, on stderr.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist; pass --model DIR of a Hugging Face checkpoint")
    cfg = Qwen3MoeConfig.from_file(path)
    files = weight_files(path)
    total = stored_nbytes(files) if progress else 0
    with tqdm(total=total, desc="loading", unit="B", unit_scale=True, file=sys.stderr, disable=not progress,
              leave=False, dynamic_ncols=True) as bar:
        params, experts = load_params(cfg, files, dtype, bar if progress else None)
    return Checkpoint(
        config=cfg,
        params=to_device(params),
        experts=to_device(experts) if experts_on_device else experts,
        dtype=jnp.dtype(dtype),
        eos_token_ids=read_eos(path),
        tokenizer=load_tokenizer(path),
        path=path,
    )


__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "load", "load_params", "weight_files"]
