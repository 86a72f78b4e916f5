"""Write a Hugging Face-format checkpoint directory of any supported family, atomically.

The inverse of `loader.load_params`, driven by the same family tables: Flax kernels [in, out]
go back to HF's [out, in] layout, fused q|k|v and q|k norms are split into their tensors, each
MoE layer's stacked experts into the family's per-expert names (Qwen3-MoE:
`mlp.experts.{j}.{gate,up,down}_proj.weight`).

Everything is written into a temporary directory beside the target and renamed into place
only when complete, so a failure midway never leaves a half-written checkpoint at `path`
(and an existing checkpoint there stays intact until the new one is whole).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors.numpy import save_file

from dynaexq_jax.experts.expert_state import HostExperts
from dynaexq_jax.io import files
from dynaexq_jax.io.loader import np_dtype
from dynaexq_jax.models import registry
from dynaexq_jax.models.config import ModelConfig

_DTYPE_NAMES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


def hf_tensors(cfg: ModelConfig, params: dict, experts: HostExperts, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF tensor name, host array in HF layout and `dtype`) for every weight of the model:
    the family adapter's tables read backwards."""
    fam = registry.adapter(cfg)
    npd = np_dtype(dtype)

    def out(t, leaf):
        a = np.asarray(leaf)
        if t.cols is not None:
            a = a[..., t.cols[0]:t.cols[1]]
        if t.interleaved:  # gate columns, then up -> alternating
            g, u = np.split(a, 2, axis=-1)
            a = np.stack([g, u], axis=-1).reshape(a.shape)
        a = (np.swapaxes(a, -1, -2) if t.linear else a).astype(npd)
        if t.cols is None and not t.linear and a.size == math.prod(t.shape):  # kept per head (MLA's kv_b_proj)
            a = a.reshape(t.shape)
        if a.shape != t.shape:
            raise ValueError(f"{t.name}: expected shape {t.shape}, got {a.shape}")
        return t.name, np.ascontiguousarray(a)

    def leaf(tree, path):
        for k in path:
            tree = tree[k]
        return tree

    top = fam.top_tensors(cfg)  # the embedding first, then the layers, then the rest (norm, head)
    for t in top:
        if t.path[0] == "embed_tokens":
            yield out(t, leaf(params, t.path))
    I = cfg.moe_intermediate_size
    for seg, stacked in zip(cfg.segments, params["layers"]):
        for j in range(seg.count):
            i = seg.first + j
            for t in fam.layer_tensors(cfg, i):
                yield out(t, np.asarray(leaf(stacked, t.path))[j])
            if seg.kind == "moe":
                m = cfg.moe_layers.index(i)
                wgu, wd = np.asarray(experts.gate_up[m]), np.asarray(experts.down[m])
                if fam.expert_tensors is None:  # a family that stores only the fused layout
                    gu, d = fam.fused_expert_tensors(cfg, i)
                    yield out(gu, wgu)
                    yield out(d, wd)
                else:
                    for e in range(cfg.num_experts):
                        g, u, d = fam.expert_tensors(cfg, i, e)
                        yield out(g, wgu[e, :, :I])
                        yield out(u, wgu[e, :, I:])
                        yield out(d, wd[e])
                if cfg.expert_bias:
                    bgu, bd = fam.expert_bias_tensors(cfg, i)
                    yield out(bgu, experts.gate_up_bias[m])
                    yield out(bd, experts.down_bias[m])
    for t in top:
        if t.path[0] != "embed_tokens":
            yield out(t, leaf(params, t.path))


def _write(path: Path, data: str | bytes):
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    path: str | Path,
    cfg: ModelConfig,
    params: dict,
    experts: HostExperts,
    *,
    tokenizer=None,
    eos_token_id: int | list[int] | None = None,
    dtype="bfloat16",
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write `path/` = config.json, generation_config.json, model.safetensors[, tokenizer.json].

    `tokenizer` is a `tokenizers.Tokenizer` (or anything with `.to_str()`), `extra_files`
    maps further file names to their contents (e.g. training metrics), written in the same
    atomic step. `path` must be new, empty or a checkpoint written here before (its marker,
    `files.MARKER`): that one is replaced, files in it this did not write staying; any other
    folder is refused (`UserError`) before anything is written. Returns the checkpoint path.
    """
    path = Path(path).absolute()
    files.check_output_dir(path, "checkpoint folder")  # before the work
    dtype_name = _DTYPE_NAMES[str(np.dtype(np_dtype(dtype)))]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tensors = dict(hf_tensors(cfg, params, experts, dtype_name))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        with open(tmp / "model.safetensors", "rb+") as f:
            os.fsync(f.fileno())
        del tensors

        config = registry.adapter(cfg).config_to_hf(cfg)
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
        files.mark(tmp, [f.name for f in tmp.iterdir()])  # what a later export may replace
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        files.install_dir(tmp, path)  # a folder of the tool's: its other files stay; any other: refused
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


__all__ = ["hf_tensors", "save_checkpoint"]
