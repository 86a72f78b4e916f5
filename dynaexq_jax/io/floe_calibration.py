"""FloE's offline calibration on disk: per-(MoE layer, expert) channel thresholds and the
inter-expert predictor's weights, one entry of the store beside the checkpoint's converted experts.

Where: `store.source_dir(checkpoint)/floe-<settings hash>-<source fingerprint>` by default
(`default_path`), or any folder given: a new or empty one, or one a calibration was written to
before (its marker, `files.MARKER`, says so; files in it the tool did not write stay). `meta.json`
records the checkpoint's fingerprint, the settings (sparsity, up projection width and group), the
calibration text's SHA-256, and a SHA-256 of every array (checked on each load, as the expert cache
does). A calibration is never used for a checkpoint, setting or shape it was not made for, nor
when damaged: each is a one-line `UserError` naming the fix, never a silent fallback, and a
calibration folder is never removed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from dynaexq_jax.errors import UserError
from dynaexq_jax.io import files, store

KIND = "floe"


@dataclasses.dataclass
class Calibration:
    thresholds: np.ndarray  # [moe_layers, E] float32: |up(x)| a channel must reach
    predictor: dict  # the early layers' MLP params ({} when none was trained)
    meta: dict


def settings(sparsity: float, up_bits: int | None, group_size: int) -> dict:
    return {"sparsity": float(sparsity), "up_bits": up_bits, "group_size": int(group_size)}


def default_path(source, sparsity: float, up_bits: int | None, group_size: int) -> Path | None:
    """The calibration's place in the cache of checkpoint folder `source` (None: no folder, or
    the cache is off)."""
    src = Path(source).resolve() if source is not None else None
    if src is None or not src.is_dir() or not store.enabled():
        return None
    slug = store._settings_slug(KIND, settings(sparsity, up_bits, group_size))
    return store.source_dir(src) / f"{slug}-{store.source_fingerprint(src)}"


def _fix(ckpt, s: dict) -> str:
    bits = "none" if s["up_bits"] is None else s["up_bits"]
    return f"run scripts/calibrate.py --model {ckpt.path} --sparsity {s['sparsity']} --up-bits {bits}"


class DamagedCalibration(UserError):
    """A calibration whose files are missing or do not match their checksums."""


def save(path: Path, ckpt, cal_settings: dict, thresholds: np.ndarray, predictor: dict, text_sha: str,
         extra: dict | None = None) -> None:
    """Write the calibration at `path`, atomically: a new or empty folder, or one the tool wrote
    (whose other files stay); any other is refused."""
    path = Path(path).resolve()
    tree = {"thresholds": np.asarray(thresholds, np.float32)}
    if predictor:
        tree["predictor"] = predictor
    meta = {"kind": KIND, "fingerprint": store.source_fingerprint(Path(ckpt.path)), "source": str(ckpt.path),
            "settings": cal_settings, "text_sha": text_sha, "version": store.FORMAT_VERSION,
            **(extra or {})}  # the arrays' shapes and checksums are the store's to add
    if not store._save_atomic(path.parent, path.name, tree, meta, replace=True):
        raise UserError(f"cannot write the FloE calibration at {path}; name a writable folder with --out")


def read_meta(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def load(path, ckpt, cal_settings: dict) -> Calibration:
    """The calibration at `path`, checked against `ckpt` and `cal_settings`."""
    path = Path(path).resolve()
    meta = read_meta(path)
    if meta is None and files.own_files(path) is not None:
        raise DamagedCalibration(f"FloE calibration {path} is damaged (its meta.json cannot be read); "
                                 f"{_fix(ckpt, cal_settings)} --out {path} to rebuild it")
    if meta is None:
        raise UserError(f"no FloE calibration at {path}; {_fix(ckpt, cal_settings)}")
    if meta.get("kind") != KIND:
        raise UserError(f"{path} is not a FloE calibration (kind {meta.get('kind')!r}); {_fix(ckpt, cal_settings)}")
    if ckpt.path is None or meta.get("fingerprint") != store.source_fingerprint(Path(ckpt.path)):
        raise UserError(f"FloE calibration {path} was made for another checkpoint ({meta.get('source')}) or other "
                        f"weights; {_fix(ckpt, cal_settings)}")
    if meta.get("settings") != cal_settings:
        raise UserError(f"FloE calibration {path} was made for {meta.get('settings')}, not {cal_settings}; "
                        f"{_fix(ckpt, cal_settings)}")
    L, E = len(ckpt.config.moe_layers), ckpt.config.num_experts
    shape = tuple(meta.get("tree", {}).get("thresholds", {}).get("shape", ()))
    if shape != (L, E):
        raise UserError(f"FloE calibration {path} holds thresholds of shape {list(shape)}, not [{L}, {E}] (moe "
                        f"layers, experts); {_fix(ckpt, cal_settings)}")
    try:
        tree = store.read_entry(path)
    except ValueError as e:  # reported, never removed: the folder may be the user's
        raise DamagedCalibration(f"FloE calibration {path} is damaged ({e}); {_fix(ckpt, cal_settings)} --out "
                                 f"{path} to rebuild it") from None
    return Calibration(np.asarray(tree["thresholds"], np.float32), tree.get("predictor") or {}, meta)
