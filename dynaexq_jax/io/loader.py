"""Load a Hugging Face MoE checkpoint directory: config, weights, tokenizer.

The family adapter (`models.registry`) names every tensor; they are streamed one at a time
from the safetensors files (memory-mapped), converted to the compute dtype and transposed into
the Flax layout. Each segment's layers are stacked into one preallocated host array, and each
MoE layer's experts into one [E, ...] array, so host memory peaks near one copy of the model.

Nothing is taken on trust: every safetensors header is checked against its file, the tensors
against what config.json implies (none missing, none unused), and every weight is checked
finite as it is converted. Experts shipped as MXFP4 stay MXFP4 on the host (`HostExperts.mxfp4`,
the checkpoint's bytes), decoded into the compute dtype only a layer at a time when a tier
asks for it (`DecodedLayers`). Each failure is one `CheckpointError` line naming the file.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import math
import mmap
import numbers
import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm import tqdm

from dynaexq_jax import inputs
from dynaexq_jax.errors import UserError
from dynaexq_jax.experts import quant
from dynaexq_jax.experts.expert_state import HostExperts, LayerSource, write_rows
from dynaexq_jax.models import registry
from dynaexq_jax.models.config import ConfigError, ModelConfig
from dynaexq_jax.models.decoder import Decoder


class CheckpointError(UserError):
    """A checkpoint directory is missing a file or holds tensors this model cannot use."""


_NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}
INDEX = "model.safetensors.index.json"
# The safetensors dtypes a weight may have, with their bytes per element.
_WEIGHT_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
# Buffers older transformers versions saved with the weights; they are recomputed, never read.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# An MXFP4 tensor X is stored as X_blocks (uint8 [..., N, K/32, 16]: two 4-bit codes a byte, the
# low nibble first) and X_scales (uint8 [..., N, K/32]: a power-of-two exponent + 127 per 32
# values), as transformers' integrations/mxfp4.py defines them; it stands for X [..., K, N].
MXFP4_SUFFIXES = ("_blocks", "_scales")
FP4_VALUES = quant.E2M1_VALUES  # e2m1 code -> value
# A block-quantized FP8 weight X (DeepSeek-V3's and MiniMax-M2's releases) is X stored as
# F8_E4M3 and X_scale_inv (float32 [ceil(out / bo), ceil(in / bi)]): each (bo, bi) block of X
# times its scale, the block size from config.json's quantization_config.weight_block_size.
FP8_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn}
FP8_SCALE = "_scale_inv"


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 blocks [..., N, G, 16] and scales [..., N, G] (uint8) -> float32 [..., G * 32, N]:
    value 2j of a block from byte j's low nibble, 2j + 1 from its high one, times 2**(scale - 127);
    the last two axes swapped, as transformers lays the weight out ([in, out])."""
    *lead, n, g, b = blocks.shape
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*lead, n, g, 2 * b)
    values = np.ldexp(FP4_VALUES[codes], scales.astype(np.int32)[..., None] - 127)
    return np.swapaxes(values.reshape(*lead, n, g * 2 * b), -1, -2)


def logical_names(names) -> set[str]:
    """The tensor names a checkpoint provides: its own, and X for each MXFP4 pair X_blocks, X_scales."""
    names = set(names)
    return names | {n[: -len("_blocks")] for n in names
                    if n.endswith("_blocks") and n[: -len("_blocks")] + "_scales" in names}


def np_dtype(dtype) -> np.dtype:
    return np.dtype(_NP_DTYPES.get(str(jnp.dtype(dtype)), dtype))


def read_json(path: Path, what: str):
    """A JSON file's contents, or a one-line CheckpointError naming it; `what` says what it holds."""
    duplicates = []

    def pairs(items):  # a key given twice: JSON keeps the last one without a word
        out = {}
        for k, v in items:
            if k in out:
                duplicates.append(k)
            out[k] = v
        return out

    text = inputs.read_text(path, f"restore {what}", error=CheckpointError)
    try:
        doc = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); restore {what}") from None
    if duplicates:
        raise CheckpointError(f"{path} gives {duplicates[0]!r} twice; restore {what}")
    return doc


def _integral(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def read_header(path: Path) -> dict:
    """The safetensors header of `path`, {tensor name: {dtype, shape, data_offsets}}, checked
    against the file's size, so a truncated or damaged file is one error line before any tensor
    is read (the format: u64 header length, a JSON header, then the tensors' bytes)."""
    size = path.stat().st_size

    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is damaged ({why}); download or export the checkpoint again")

    if size < 8:
        raise damaged(f"{size} bytes, too short for a safetensors header")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise damaged(f"its header claims {n} bytes, the file holds {size - 8} after the length")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        raise damaged("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, t in header.items():
        _check_entry(path, name, t, data, damaged)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if end != data:
        raise damaged(f"its tensors span {end} bytes of data, the file holds {data}")
    return header


def _check_entry(path: Path, name: str, t, data: int, damaged) -> None:
    """One header entry: a floating-point dtype (uint8 only for MXFP4 blocks and scales), a
    shape, and offsets that match them and fit the data (a wrong dtype would reinterpret the
    bytes: integers read as weights)."""
    dtype = t.get("dtype") if isinstance(t, dict) else None
    itemsize = (_WEIGHT_ITEMSIZE.get(dtype) or (1 if dtype in FP8_DTYPES else None)
                or (1 if dtype == "U8" and name.endswith(MXFP4_SUFFIXES) else None))
    if itemsize is None:
        raise CheckpointError(f"{path}: tensor {name!r} is stored as {dtype!r}, not as one of "
                              f"{', '.join(_WEIGHT_ITEMSIZE)} (or F8_E4M3 with block scales, U8 MXFP4 blocks and "
                              "scales); the file is damaged, or quantized in a way that is not supported: download "
                              "the model's bf16 release")
    shape, offsets = t.get("shape"), t.get("data_offsets")
    if not (isinstance(shape, list) and all(_integral(d) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(map(_integral, offsets))):
        raise damaged(f"tensor {name!r} has no valid shape and data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data or end - begin != math.prod(shape) * itemsize:
        raise damaged(f"tensor {name!r} has data_offsets {offsets} that do not fit its shape or the file")


def read_index(path: Path) -> dict | None:
    """The checkpoint's shard index (None without one), checked to be a JSON object with a
    `weight_map` of tensor names to shard file names and, if any, an integer total_size."""
    index = path / INDEX
    if not index.is_file():
        return None
    doc = read_json(index, "it from the model's release")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map naming each tensor's shard; restore it from the "
                              "model's release")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict) or not _integral(metadata.get("total_size", 0)):
        raise CheckpointError(f"{index} has no integer metadata.total_size; restore it from the model's release")
    return doc


def weight_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it, checking every file's header
    and that each tensor the index names is in the shard it names."""
    index = path / INDEX
    doc = read_index(path)
    if doc is not None:
        files = {}
        for name, fname in doc["weight_map"].items():
            if not isinstance(fname, str) or Path(fname).name != fname:
                raise CheckpointError(f"{index} maps {name!r} to {fname!r}, not a file name in {path}; restore it")
            if not (path / fname).is_file():
                raise CheckpointError(f"shard {fname} named by {index.name} is missing from {path}")
            files[name] = path / fname
        headers = {f: read_header(f) for f in set(files.values())}
        for name, f in files.items():
            if name not in headers[f]:
                raise CheckpointError(f"{index} puts {name!r} in {f.name}, which does not hold it; restore the "
                                      "index from the model's release")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"{path} has neither model.safetensors nor {INDEX}; "
            "point --model at a Hugging Face checkpoint directory"
        )
    return {name: single for name in read_header(single)}


def stored_nbytes(files: dict[str, Path]) -> int:
    """Bytes of the named tensors as stored, from the safetensors headers (no tensor is read)."""
    total = 0
    for path in set(files.values()):
        header = read_header(path)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k in files)
    return total


def expected_tensors(cfg: ModelConfig, names) -> list[str]:
    """The tensor names `load_params` reads for `cfg` from a checkpoint holding `names`."""
    fam = registry.adapter(cfg)
    out = [t.name for t in fam.top_tensors(cfg)]
    for i in range(cfg.num_layers):
        out += [t.name for t in fam.layer_tensors(cfg, i)]
    return out + expert_tensor_names(cfg, names)


def expert_tensor_names(cfg: ModelConfig, names) -> list[str]:
    """The names of the experts' tensors (and their biases) among those `load_params` reads."""
    fam = registry.adapter(cfg)
    names = logical_names(names)
    out = []
    for i in cfg.moe_layers:
        fused = fam.fused_expert_tensors(cfg, i)
        if fused[0].name in names or fam.expert_tensors is None:  # None: the family stores only fused experts
            out += [t.name for t in fused]
        else:
            out += [t.name for e in range(cfg.num_experts) for t in fam.expert_tensors(cfg, i, e)]
        if cfg.expert_bias:
            out += [t.name for t in fam.expert_bias_tensors(cfg, i)]
    return out


def ignored_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    """Names of tensors the family does not load (multi-token-prediction heads, a vision tower):
    its adapter's `ignored_prefixes(cfg)`, or its constant `IGNORED_PREFIXES`."""
    fam = registry.adapter(cfg)
    fn = getattr(fam, "ignored_prefixes", None)
    return tuple(fn(cfg)) if fn else getattr(fam, "IGNORED_PREFIXES", ())


def fp8_block(path: Path) -> tuple[int, int] | None:
    """config.json's quantization_config.weight_block_size (the adapter has accepted it), or None."""
    doc = read_json(path / "config.json", "it from the model's release")
    q = doc.get("quantization_config") if isinstance(doc, dict) else None
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        return None
    return tuple(q["weight_block_size"])


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float8 w [out, in] and its block scales [ceil(out / bo), ceil(in / bi)] -> float32 w, each
    block times its scale (the last blocks of a row or column may be partial)."""
    bo, bi = block
    out, inp = w.shape[-2:]
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), bo, axis=-2), bi, axis=-1)[..., :out, :inp]
    return w.astype(np.float32) * s


def check_tensor_names(cfg: ModelConfig, files: dict[str, Path], path: Path) -> None:
    """The checkpoint holds exactly the tensors config.json implies: a config that disagrees with
    the weights (fewer layers, tied embeddings beside an lm_head) would otherwise run, wrongly."""
    wanted = expected_tensors(cfg, files)
    present = logical_names(files)
    missing = [n for n in wanted if n not in present]
    used = set(wanted) | {n + s for n in wanted if n not in files for s in MXFP4_SUFFIXES}
    used |= {n + FP8_SCALE for n in wanted if n + FP8_SCALE in files}
    ignored = ignored_prefixes(cfg)
    unused = sorted(set(files) - used - {n for n in files if n.endswith(_IGNORED_SUFFIXES) or n.startswith(ignored)})
    hint = ("config.json does not match the weights: check num_hidden_layers, num_experts, mlp_only_layers "
            "and tie_word_embeddings against the model's release")
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensor(s) that config.json implies, e.g. {missing[0]!r}; "
                              + hint)
    if unused:
        raise CheckpointError(f"{path} holds {len(unused)} tensor(s) that config.json does not use, e.g. "
                              f"{unused[0]!r}; " + hint)


def all_finite(a: np.ndarray) -> bool:
    """Whether no element is NaN or Inf, at memory speed: bfloat16 by its exponent bits (all ones
    exactly for Inf and NaN), since numpy widens bfloat16 one element at a time."""
    if a.dtype == ml_dtypes.bfloat16:
        return bool((np.ascontiguousarray(a).view(np.uint16) & 0x7F80).max(initial=0) != 0x7F80)
    return bool(np.isfinite(a).all())


_ST_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "U8": np.uint8}


class _TensorReader:
    """Reads named tensors from safetensors files, each file mapped once (a tensor is a view of
    the mapping until converted); `progress` (a tqdm bar, or None) advances by each tensor's
    stored bytes, `bytes_read` counts them."""

    def __init__(self, files: dict[str, Path], dtype, progress=None, fp8_block: tuple[int, int] | None = None):
        self.files = files
        self.names = logical_names(files)
        self.dtype = np_dtype(dtype)
        self._maps = {}  # path -> (mapping, header, start of the data)
        self.progress = progress
        self.bytes_read = 0
        self.fp8_block = fp8_block

    def __contains__(self, name):
        return name in self.names

    def _mapped(self, path: Path):
        if path not in self._maps:
            header = read_header(path)  # checked against the file: offsets fit
            try:
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path} cannot be read ({e}); download or export the checkpoint again") \
                    from None
            self._maps[path] = (buf, header, 8 + n)
        return self._maps[path]

    def _header(self, name: str) -> dict:
        return self._mapped(self.files[name])[1][name]

    def _read(self, name: str, index=None) -> np.ndarray:
        """Tensor `name` as stored, a read-only view of the mapped file (an FP8 one dequantized
        with its block scales); `index` (along axis 0) takes only that part, and only its bytes
        count as read."""
        buf, header, start = self._mapped(self.files[name])
        h = header[name]
        fp8 = h["dtype"] in FP8_DTYPES
        a = np.frombuffer(buf, FP8_DTYPES[h["dtype"]] if fp8 else _ST_NUMPY[h["dtype"]],
                          count=int(np.prod(h["shape"], dtype=np.int64)),
                          offset=start + h["data_offsets"][0]).reshape(h["shape"])
        if fp8:  # dequantized whole: its blocks span the rows an index would cut
            a = self._dequantize_fp8(name, self._count(a))
            return a if index is None else a[index]
        return self._count(a if index is None else a[index])

    def _dequantize_fp8(self, name: str, w: np.ndarray) -> np.ndarray:
        """An F8_E4M3 tensor to float32 with its block scales."""
        path = self.files[name]
        if name + FP8_SCALE not in self.files or self.fp8_block is None:
            raise CheckpointError(f"{path}: tensor {name!r} is stored as float8 without its {name + FP8_SCALE!r} and "
                                  "a quantization_config.weight_block_size in config.json; restore both from the "
                                  "model's release")
        scale = self._read(name + FP8_SCALE)
        rows, cols = w.shape[-2:] if w.ndim >= 2 else (0, 0)
        bo, bi = self.fp8_block
        if w.ndim < 2 or scale.shape != (*w.shape[:-2], -(-rows // bo), -(-cols // bi)):
            raise CheckpointError(f"{path}: FP8 tensor {name!r} {tuple(w.shape)} has scales {tuple(scale.shape)}, not "
                                  f"one per {bo}x{bi} block (quantization_config.weight_block_size); restore it from "
                                  "the model's release")
        return dequantize_fp8(w, scale, self.fp8_block)

    def _count(self, a: np.ndarray) -> np.ndarray:
        self.bytes_read += a.nbytes
        if self.progress is not None:
            self.progress.update(a.nbytes)
        return a

    def stored(self, t) -> np.ndarray:
        """Tensor `t` as the file stores it (a read-only view of the mapping; FP8 dequantized),
        its shape checked."""
        if t.name not in self.files:
            raise CheckpointError(f"checkpoint lacks tensor {t.name!r}; is it a complete checkpoint of this model "
                                  "type?")
        shape = tuple(self._header(t.name)["shape"])
        if shape != t.shape:
            raise CheckpointError(f"tensor {t.name!r} has shape {shape}, config.json implies {t.shape}")
        return self._read(t.name)

    def get(self, t, index=None, dtype=None) -> np.ndarray:
        """Tensor `t` (an adapter's `Tensor`) in our layout: shape checked, [..., in, out] if
        linear, gate columns before up if interleaved; MXFP4 decoded one expert at a time.
        `index` (an int or slice along axis 0, e.g. experts of a fused tensor): only that part
        is read (an MXFP4 tensor is decoded whole first). In `dtype` (default the compute dtype)."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        if t.name not in self.names:
            raise CheckpointError(f"checkpoint lacks tensor {t.name!r}; is it a complete checkpoint of this model "
                                  "type?")
        if t.name in self.files:
            shape = tuple(self._header(t.name)["shape"])
            if shape != t.shape:
                raise CheckpointError(f"tensor {t.name!r} has shape {shape}, config.json implies {t.shape}")
            a = self._layout(t, self._read(t.name, index).astype(dtype, copy=False))
            if not a.flags.writeable:  # still a view of the file: the caller owns what it gets
                a = a.copy()
        else:
            a = decode_layer(self.mxfp4(t), dtype)
            a = a if index is None else a[index]
        # Checked as each tensor is converted, one more pass over memory just read: a NaN or
        # Inf weight would otherwise come out as garbage tokens, or none.
        if not all_finite(a):
            raise CheckpointError(f"tensor {t.name!r} in {self.files.get(t.name, self.files.get(t.name + '_blocks'))} "
                                  f"holds NaN or Inf values (or values too large for {dtype}); the checkpoint "
                                  "is damaged: download or export it again")
        return a

    @staticmethod
    def _layout(t, a: np.ndarray) -> np.ndarray:
        if t.linear:
            a = np.swapaxes(a, -1, -2)
        if t.interleaved:
            a = np.concatenate([a[..., 0::2], a[..., 1::2]], axis=-1)
        return a

    def is_mxfp4(self, t) -> bool:
        """Whether the checkpoint stores `t` as MXFP4 blocks and scales."""
        return t.name not in self.files and t.name in self.names

    def mxfp4(self, t) -> quant.Mxfp4Tensor:
        """`t` as the checkpoint's MXFP4 bytes, wrapped, not decoded: a host `Mxfp4Tensor` whose
        columns are in our order (an interleaved gate|up tensor moves whole rows of blocks and
        their scales; no byte changes). Checked that every value is finite in the compute dtype
        (from the scales alone: e2m1's largest magnitude is 6)."""
        blocks, scales = self._read(t.name + "_blocks"), self._read(t.name + "_scales")
        s = blocks.shape
        decoded = (*s[:-3], 2 * s[-1] * s[-2], s[-3]) if blocks.ndim >= 3 else None  # [..., K, N]
        if decoded != t.shape or scales.shape != s[:-1] or s[-1] != quant.MXFP4_BLOCK // 2:
            raise CheckpointError(f"MXFP4 tensor {t.name!r} has blocks {blocks.shape} and scales {scales.shape}, "
                                  f"config.json implies a {t.shape} weight (blocks [..., N, K/32, 16], scales "
                                  "[..., N, K/32])")
        if t.linear:  # transformers' MXFP4 tensors are [in, out] already (gpt-oss's fused experts)
            raise CheckpointError(f"MXFP4 tensor {t.name!r} is stored [out, in], which is not supported; "
                                  "download the model's bf16 release")
        if scales.size and 6.0 * 2.0 ** (int(scales.max()) - 127) > float(ml_dtypes.finfo(self.dtype).max):
            raise CheckpointError(f"MXFP4 tensor {t.name!r} in {self.files[t.name + '_scales']} has scales of up to "
                                  f"2**{int(scales.max()) - 127}, too large for {self.dtype} (or NaN); the checkpoint "
                                  "is damaged: download or export it again")
        if t.interleaved:  # N is axis -3 of the blocks, -2 of the scales
            n = s[-3]
            perm = np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])
            blocks, scales = np.take(blocks, perm, axis=-3), np.take(scales, perm, axis=-2)
        return quant.mxfp4_from_blocks(blocks, scales)


def decode_layer(t: quant.Mxfp4Tensor, dtype) -> np.ndarray:
    """A host `Mxfp4Tensor` [E, K, N] decoded into `dtype`, expert by expert (a whole layer in
    float32 would be GBs)."""
    E, K, N = t.shape
    out = np.empty(t.shape, dtype)
    for e in range(E):
        out[e] = decode_mxfp4(np.asarray(t.blocks[e]).reshape(N, K // quant.MXFP4_BLOCK, quant.MXFP4_BLOCK // 2),
                              np.asarray(t.scales[e]))
    return out


class DecodedLayers(collections.abc.Sequence):
    """Item j (gate_up 0, down 1) of each layer's MXFP4 pair, decoded into `dtype` on access: the
    checkpoint-dtype experts of an MXFP4 checkpoint, for the tiers that want them (full's bank,
    dynaexq's slots, offload's host copies), made one layer at a time and never kept but the
    last (which consumers' repeated `[0].shape` reads)."""

    def __init__(self, layers, item: int, dtype):
        self.layers, self.item, self.dtype = layers, item, dtype
        self._last = (None, None)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._last[0] != i:
            self._last = (None, None)  # the previous layer freed before the next is decoded
            self._last = (i, decode_layer(self.layers[i][self.item], self.dtype))
        return self._last[1]


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
    reader: object | None = None  # what reads the safetensors files (experts are read on demand)
    generated: object | None = None  # a preset's `store.Generated` recipe (its experts are made, not read)

    @property
    def bytes_read(self) -> int:
        """Bytes of tensors read from the safetensors files so far."""
        return self.reader.bytes_read if self.reader is not None else 0

    @property
    def source(self):
        """What the converted-expert cache keys this checkpoint's experts by: its folder, or a
        preset's recipe."""
        return self.generated if self.generated is not None else self.path


def read_eos(path: Path) -> tuple[int, ...]:
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.is_file():
            doc = read_json(f, "it from the model's release")
            eos = doc.get("eos_token_id") if isinstance(doc, dict) else None
            if eos is None:
                continue
            ids = eos if isinstance(eos, list) else [eos]
            if not all(_integral(i) and i >= 0 for i in ids):
                raise CheckpointError(f"{f} has eos_token_id={eos!r}, not a token id or a list of them; restore it "
                                      "from the model's release")
            return tuple(int(i) for i in ids)
    return ()


def load_tokenizer(path: Path):
    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    from tokenizers import Tokenizer

    text = inputs.read_text(f, "restore it from the model's release", error=CheckpointError)
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for any file it cannot parse
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{f} cannot be read ({why}); restore it from the model's release") from None


def _fill(leaf: np.ndarray, t, value: np.ndarray) -> None:
    """Write `value` where tensor `t` goes in `leaf` (all of it, or its column range)."""
    if t.cols is None:  # whole (in the parameter's shape: MLA's kv_b_proj is kept per head)
        leaf[...] = value.reshape(leaf.shape)
    else:
        leaf[..., t.cols[0]:t.cols[1]] = value


def _leaf(tree: dict, path: tuple[str, ...]) -> np.ndarray:
    for k in path:
        tree = tree[k]
    return tree


def load_params(cfg: ModelConfig, files: dict[str, Path], dtype, progress=None,
                reader=None) -> tuple[dict, HostExperts]:
    """Read every non-expert tensor into our layout, on the host: (non-expert params, experts
    read on access from the mapped files).

    The parameter tree is allocated from the decoder's own shapes (segments stacked), then
    each checkpoint tensor is written where the family adapter says it goes."""
    fam = registry.adapter(cfg)
    r = reader or _TensorReader(files, dtype, progress)
    shapes = Decoder(cfg, dtype).param_shapes()
    # The compute dtype, but where the decoder keeps a parameter in float32 (sigmoid routers).
    params = jax.tree.map(lambda a: np.empty(a.shape, np.float32 if a.dtype == jnp.float32 else r.dtype), shapes)
    for t in fam.top_tensors(cfg):
        leaf = _leaf(params, t.path)
        _fill(leaf, t, r.get(t, dtype=leaf.dtype))
    for seg, stacked in zip(cfg.segments, params["layers"]):
        for j in range(seg.count):
            for t in fam.layer_tensors(cfg, seg.first + j):
                leaf = _leaf(stacked, t.path)
                _fill(leaf[j], t, r.get(t, dtype=leaf.dtype))
    fused = [fam.fused_expert_tensors(cfg, i) for i in cfg.moe_layers]
    if fused and all(r.is_mxfp4(t) for pair in fused for t in pair):  # shipped 4-bit: kept as shipped
        mxfp4 = [(r.mxfp4(gu), r.mxfp4(d)) for gu, d in fused]
        experts = dict(gate_up=DecodedLayers(mxfp4, 0, r.dtype), down=DecodedLayers(mxfp4, 1, r.dtype), mxfp4=mxfp4)
    else:  # read when a tier asks, from the mapped files
        experts = dict(gate_up=CheckpointLayers(cfg, fam, r, 0), down=CheckpointLayers(cfg, fam, r, 1))
    if cfg.expert_bias:  # [L, E, 2I] and [L, E, H]: small, one array each
        pairs = [[r.get(t) for t in fam.expert_bias_tensors(cfg, i)] for i in cfg.moe_layers]
        experts.update(gate_up_bias=np.stack([p[0] for p in pairs]), down_bias=np.stack([p[1] for p in pairs]))
    return params, HostExperts(**experts)


class CheckpointLayers(LayerSource):
    """Item `item` (gate_up 0, down 1) of every MoE layer's experts, read from the mapped
    safetensors files on access, in our layout: nothing is held, a layer or an expert is read
    (and checked finite) when a consumer asks for it. Experts stored one tensor each are read
    one by one; a fused [E, ...] tensor is read in the slice asked for."""

    memory_kind = "mapped checkpoint"

    def __init__(self, cfg: ModelConfig, fam, reader: _TensorReader, item: int):
        self.cfg, self.fam, self.r, self.item = cfg, fam, reader, item
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.shape = (E, H, 2 * I) if item == 0 else (E, I, H)
        self.dtype = reader.dtype
        self.num_layers = len(cfg.moe_layers)

    def _fused(self, layer: int):
        """The layer's fused tensor of this item, or None where experts are stored one by one."""
        t = self.fam.fused_expert_tensors(self.cfg, self.cfg.moe_layers[layer])[self.item]
        return t if t.name in self.r or self.fam.expert_tensors is None else None

    def _experts(self, layer: int, ids) -> np.ndarray:
        """Experts `ids` (a range) of `layer`, [len(ids), K, N]."""
        fused = self._fused(layer)
        if fused is not None:
            return self.r.get(fused, slice(ids.start, ids.stop, ids.step))
        out = np.empty((len(ids),) + self.shape[1:], self.dtype)
        i, I = self.cfg.moe_layers[layer], self.cfg.moe_intermediate_size
        for k, e in enumerate(ids):
            g, u, d = self.fam.expert_tensors(self.cfg, i, e)
            if self.item == 0:
                out[k, :, :I], out[k, :, I:] = self.r.get(g), self.r.get(u)
            else:
                out[k] = self.r.get(d)
        return out

    def __getitem__(self, layer: int) -> np.ndarray:
        if isinstance(layer, slice):
            return [self[j] for j in range(*layer.indices(len(self)))]
        if not 0 <= layer < self.num_layers:
            raise IndexError(layer)
        return self._experts(layer, range(self.shape[0]))

    def expert(self, layer: int, e: int) -> np.ndarray:
        return self._experts(layer, range(e, e + 1))[0]

    def _plain(self, layer: int) -> bool:
        """Whether the layer's experts are stored one [out, in] tensor each, whole (the layout
        `columns` and `on_device` read directly; others take the general path)."""
        i = self.cfg.moe_layers[layer]
        return self._fused(layer) is None and all(t.linear and not t.interleaved and t.cols is None
                                                  for t in self.fam.expert_tensors(self.cfg, i, 0))

    @functools.cached_property
    def _all_plain(self) -> bool:
        return all(self._plain(layer) for layer in range(self.num_layers))

    def _parts(self, layer: int, e: int) -> list:
        """This item's stored tensors of expert `e`: gate and up, or down."""
        g, u, d = self.fam.expert_tensors(self.cfg, self.cfg.moe_layers[layer], int(e))
        return [g, u] if self.item == 0 else [d]

    def stored_expert(self, layer: int, e: int) -> tuple[np.ndarray, ...]:
        """The expert's tensors as stored ([out, in] views of the mapped file, no copy): a
        promotion copies them and `in_layout` transposes them on the device (see `on_device`).
        Not checked finite again: the conversion read and checked these bytes."""
        if not self._all_plain:
            return super().stored_expert(layer, e)
        return tuple(self.r.stored(t) for t in self._parts(layer, e))

    def in_layout(self, stored: tuple) -> jax.Array:
        if not self._all_plain:
            return super().in_layout(stored)
        return _expert_in_our_layout(tuple(stored), self.dtype)

    def columns(self, layer: int, stride: int) -> np.ndarray:
        """Every `stride`-th column of each stored matrix: its every stride-th row in the file
        ([out, in]), read contiguously (gate's, then up's, for gate_up)."""
        if not self._plain(layer):
            return super().columns(layer, stride)  # a layout this reading does not cover: the whole layer
        out = []
        for e in range(self.shape[0]):
            rows = [self.r._read(t.name, slice(None, None, stride)).astype(self.dtype) for t in self._parts(layer, e)]
            out.append(np.concatenate(rows).T)  # [K, N / stride]
        sample = np.stack(out)
        if not all_finite(sample):  # what is read is checked, as a whole layer is
            raise self._damaged(layer)
        return sample

    def _damaged(self, layer: int) -> CheckpointError:
        return CheckpointError(f"MoE layer {self.cfg.moe_layers[layer]}'s experts hold NaN or Inf values (or values "
                               f"too large for {self.dtype}); the checkpoint is damaged: download or export it again")

    def on_device(self, layer: int, device=None, experts: slice | np.ndarray = slice(None)) -> jax.Array:
        """Each tensor as stored ([out, in]) put on the device from the mapped file, and the
        experts put in our layout there: numpy's transposing copy of 2-byte values runs at
        0.24 GB/s on the CPU machines, XLA's at memory speed. Finite-checked there too. Other
        layouts: expert by expert in our layout into one device buffer."""
        ids = np.arange(self.shape[0])[experts]
        if self._plain(layer):
            tensors = [t for e in ids for t in self._parts(layer, e)]
            x, finite = _in_our_layout([jax.device_put(self.r.stored(t), device) for t in tensors],
                                       2 if self.item == 0 else 1, self.dtype)
            if not finite:  # which one: read again on the host, only now
                for t in tensors:
                    self.r.get(t)  # raises, naming the tensor
                raise self._damaged(layer)
            return x
        buf = jnp.zeros((len(ids),) + self.shape[1:], self.dtype, device=device)
        for k, e in enumerate(ids):
            buf = write_rows(buf, jax.device_put(self._experts(layer, range(int(e), int(e) + 1)), device), k)
        return buf


def _in_our_layout(stored: list, parts: int, dtype) -> tuple[jax.Array, jax.Array]:
    """E * `parts` stored [out, in] tensors, expert-major -> ([E, in, parts * out] in `dtype`:
    gate's columns then up's; whether every value is finite). Two calls: XLA's CPU backend
    fuses the transposes into the stack and runs the whole at 0.15 GB/s; apart, at 1 GB/s."""
    experts, finite = _transposed(stored, parts)
    return _stacked(experts, dtype), finite


def _one_in_our_layout(stored) -> jax.Array:
    """One expert's stored [out, in] tensors (gate and up, or down) -> [in, parts * out]."""
    return jnp.concatenate(stored, axis=0).T


@functools.partial(jax.jit, static_argnums=1)
def _transposed(stored: list, parts: int):
    experts = [_one_in_our_layout(stored[e : e + parts]) for e in range(0, len(stored), parts)]
    return experts, jnp.all(jnp.stack([jnp.all(jnp.isfinite(s)) for s in stored]))


@functools.partial(jax.jit, static_argnums=1)
def _stacked(experts: list, dtype):
    return jnp.stack(experts).astype(dtype)


@functools.partial(jax.jit, static_argnums=1)
def _expert_in_our_layout(stored: tuple, dtype):
    return _one_in_our_layout(stored).astype(dtype)


def to_device(tree):
    """Move a host pytree to the default device leaf by leaf (no second full host copy)."""
    return jax.tree.map(lambda a: jax.device_put(np.ascontiguousarray(a)), tree)


def load(path: str | Path, dtype=jnp.bfloat16, *, progress: bool = False) -> Checkpoint:
    """Load a Hugging Face checkpoint directory: non-expert weights onto the default device,
    experts left in the mapped files, each read when a policy asks for it (so a process of a
    mesh reads only its own, and nothing holds a second copy of them). `progress` shows a bar of
    the non-expert bytes read, with rate and ETA, on stderr."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist; pass --model DIR of a Hugging Face checkpoint")
    cfg = registry.read_config(path)
    files = weight_files(path)
    check_tensor_names(cfg, files, path)
    eos, tokenizer = read_eos(path), load_tokenizer(path)  # before the weights: a bad file fails fast
    experts = set(expert_tensor_names(cfg, files))
    total = stored_nbytes({n: f for n, f in files.items() if n not in experts}) if progress else 0
    reader = _TensorReader(files, dtype, fp8_block=fp8_block(path))
    with tqdm(total=total, desc="loading", unit="B", unit_scale=True, file=sys.stderr, disable=not progress,
              leave=False, dynamic_ncols=True) as bar:
        reader.progress = bar if progress else None
        params, experts = load_params(cfg, files, dtype, reader=reader)
        reader.progress = None
    return Checkpoint(
        config=cfg,
        params=to_device(params),
        experts=experts,
        dtype=jnp.dtype(dtype),
        eos_token_ids=eos,
        tokenizer=tokenizer,
        path=path,
        reader=reader,
    )


__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "load", "load_params", "weight_files"]
