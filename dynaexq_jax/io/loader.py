"""Load a Hugging Face MoE checkpoint directory: config, weights, tokenizer.

The family adapter (`models.registry`) names every tensor; they are streamed one at a time
from the safetensors files (memory-mapped), converted to the compute dtype and transposed into
the Flax layout. Each segment's layers are stacked into one preallocated host array, and each
MoE layer's experts into one [E, ...] array, so host memory peaks near one copy of the model.
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

from dynaexq_jax.errors import UserError
from dynaexq_jax.experts.expert_state import HostExperts
from dynaexq_jax.models import registry
from dynaexq_jax.models.config import ConfigError, ModelConfig
from dynaexq_jax.models.decoder import Decoder


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

    def __init__(self, files: dict[str, Path], dtype, progress=None):
        self.files = files
        self.dtype = np_dtype(dtype)
        self._open = {}
        self.progress = progress

    def __contains__(self, name):
        return name in self.files

    def get(self, t) -> np.ndarray:
        """Tensor `t` (an adapter's `Tensor`) in our layout: shape checked, [in, out] if linear."""
        if t.name not in self.files:
            raise CheckpointError(f"checkpoint lacks tensor {t.name!r}; is it a complete checkpoint of this model type?")
        path = self.files[t.name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="numpy")
        a = self._open[path].get_tensor(t.name)
        if a.shape != t.shape:
            raise CheckpointError(f"tensor {t.name!r} has shape {a.shape}, config.json implies {t.shape}")
        if self.progress is not None:
            self.progress.update(a.nbytes)
        a = a.astype(self.dtype, copy=False)
        return a.T if t.linear else a


@dataclasses.dataclass
class Checkpoint:
    """What `load` returns: the config, non-expert params on the device, experts on the host."""

    config: ModelConfig
    params: dict  # Flax params of everything but the experts (see models.decoder)
    experts: HostExperts
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


def _fill(leaf: np.ndarray, t, value: np.ndarray) -> None:
    """Write `value` where tensor `t` goes in `leaf` (all of it, or its column range)."""
    if t.cols is None:
        leaf[...] = value
    else:
        leaf[..., t.cols[0]:t.cols[1]] = value


def _leaf(tree: dict, path: tuple[str, ...]) -> np.ndarray:
    for k in path:
        tree = tree[k]
    return tree


def load_params(cfg: ModelConfig, files: dict[str, Path], dtype, progress=None) -> tuple[dict, HostExperts]:
    """Read every tensor into our layout, on the host: (non-expert params, experts).

    The parameter tree is allocated from the decoder's own shapes (segments stacked), then
    each checkpoint tensor is written where the family adapter says it goes."""
    fam = registry.adapter(cfg)
    r = _TensorReader(files, dtype, progress)
    shapes = Decoder(cfg, dtype).param_shapes()
    params = jax.tree.map(lambda a: np.empty(a.shape, r.dtype), shapes)
    for t in fam.top_tensors(cfg):
        _fill(_leaf(params, t.path), t, r.get(t))
    for seg, stacked in zip(cfg.segments, params["layers"]):
        for j in range(seg.count):
            for t in fam.layer_tensors(cfg, seg.first + j):
                _fill(_leaf(stacked, t.path)[j], t, r.get(t))
    gate_up, down = [], []
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    for i in cfg.moe_layers:
        wgu = np.empty((E, H, 2 * I), r.dtype)  # [E, H, 2I]: gate columns, then up
        wd = np.empty((E, I, H), r.dtype)  # [E, I, H]
        fused_gu, fused_d = fam.fused_expert_tensors(cfg, i)
        if fused_gu.name in r:  # transformers' in-memory layout, when saved unconverted
            wgu[:] = r.get(fused_gu).transpose(0, 2, 1)
            wd[:] = r.get(fused_d).transpose(0, 2, 1)
        else:
            for e in range(E):
                g, u, d = fam.expert_tensors(cfg, i, e)
                wgu[e, :, :I], wgu[e, :, I:], wd[e] = r.get(g), r.get(u), r.get(d)
        gate_up.append(wgu)
        down.append(wd)
    return params, HostExperts(gate_up=gate_up, down=down)


def to_device(tree):
    """Move a host pytree to the default device leaf by leaf (no second full host copy)."""
    return jax.tree.map(lambda a: jax.device_put(np.ascontiguousarray(a)), tree)


def load(path: str | Path, dtype=jnp.bfloat16, *, progress: bool = False) -> Checkpoint:
    """Load a Hugging Face checkpoint directory: non-expert weights onto the default device,
    experts into host memory (a policy decides what of them goes to the device, and how).
    `progress` shows a bar of bytes read, with rate and ETA, on stderr."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist; pass --model DIR of a Hugging Face checkpoint")
    cfg = ModelConfig.from_file(path)
    files = weight_files(path)
    total = stored_nbytes(files) if progress else 0
    with tqdm(total=total, desc="loading", unit="B", unit_scale=True, file=sys.stderr, disable=not progress,
              leave=False, dynamic_ncols=True) as bar:
        params, experts = load_params(cfg, files, dtype, bar if progress else None)
    return Checkpoint(
        config=cfg,
        params=to_device(params),
        experts=experts,
        dtype=jnp.dtype(dtype),
        eos_token_ids=read_eos(path),
        tokenizer=load_tokenizer(path),
        path=path,
    )


__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "load", "load_params", "weight_files"]
