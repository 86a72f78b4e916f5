"""Nothing the tool did not write is deleted or overwritten.

Every flag that names an output path takes it only when it is new, empty or the tool's own
output (its mark: a folder's marker, a JSON output's `written_by`, a Markdown first line, a
PNG text chunk), and refuses anything else with one error line before any work, leaving it as
it was. A folder the tool writes again keeps the files the user put in it; a damaged entry of
the tool's own cache loses only what the tool wrote; a calibration folder a user names is
reported when damaged, never removed.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax import launch
from dynaexq_jax.cli import bench, generate
from dynaexq_jax.cli import eval as eval_cli
from dynaexq_jax.errors import UserError
from dynaexq_jax.io import files, floe_calibration, hf_export, loader, preset, store
from dynaexq_jax.policies.hotness import HotnessTracker

from conftest import script

NOTES = "the user's own notes\n"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below `root` (or `root` itself) with its bytes: equal before and after = untouched."""
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def user_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text('{"mine": true}\n' if name.endswith(".json") else NOTES)  # JSON too: but not the tool's
    return path


def user_folder(tmp_path: Path) -> Path:
    path = tmp_path / "mine"
    path.mkdir()
    (path / "notes.txt").write_text(NOTES)
    return path


def command(name: str):
    return {"generate": generate, "eval": eval_cli, "bench": bench}.get(name) or script(name)


SMOKE = ["--preset", "qwen3-moe-smoke"]
# Every flag that names an output: (command, flags before the path, the flag, a file or a folder).
OUTPUTS = [
    ("generate", ["--prompt", "x", "--max-new-tokens", "1"], "--save-hotness", "file"),
    ("eval", [], "--json", "file"),
    ("bench", SMOKE, "--json", "file"),
    ("bench", SMOKE, "--plot", "file"),
    ("calibrate", [], "--out", "dir"),
    ("aot_report", SMOKE, "--dump-hlo", "dir"),
    ("gpu_check", ["--smoke"], "--out", "dir"),
    ("build_tasks", [], "--out", "dir"),
    ("train_tiny", [], "--out", "dir"),
    ("bench_startup", [], "--work-dir", "dir"),
    ("bench_startup", [], "--json", "file"),
    ("bench_runtime", ["--budget", "64MB"], "--json", "file"),
    ("bench_cpu", [], "--json", "file"),
    ("accuracy_sweep", [], "--md", "file"),
    ("accuracy_sweep", [], "--json", "file"),
    ("accuracy_sweep", [], "--plot", "file"),
]


@pytest.mark.parametrize("name, argv, flag, kind", OUTPUTS, ids=[f"{o[0]} {o[2]}" for o in OUTPUTS])
def test_an_output_flag_refuses_what_the_user_owns_before_any_work(capsys, tmp_path, name, argv, flag, kind):
    targets = [user_folder(tmp_path)] if kind == "dir" else [user_file(tmp_path, "results.json"),
                                                               user_file(tmp_path, "notes.md")]
    if kind == "dir":  # a file where a folder is named is refused too
        targets.append(user_file(tmp_path, "notes.txt"))
    main = command(name).main
    for target in targets:
        before = snapshot(tmp_path)
        code = main([*argv, flag, str(target)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and flag in err, (target, err)
        assert snapshot(tmp_path) == before  # nothing changed, nothing added


def test_a_file_the_tool_wrote_is_its_own_and_nothing_else_is(tmp_path):
    ours = {"results.json": lambda p: files.write_json(p, {"results": []}),
            "table.md": lambda p: files.write_markdown(p, "| a |\n"),
            "profile.json": lambda p: HotnessTracker(2, 4, 8.0, np.ones((2, 4))).save(p),
            "plot.png": lambda p: p.write_bytes(png(files.WRITTEN_BY))}
    theirs = {"results.json": '{"results": []}', "written.json": '{"written_by": "someone else"}',
              "list.json": f'["{files.WRITTEN_BY}"]', "README.md": f"# {files.WRITTEN_BY}\n",
              "plot.png": png("Matplotlib version3.10"), "notes.txt": NOTES}
    for name, write in ours.items():
        write(tmp_path / name)
        assert files.is_own_file(tmp_path / name), name
        files.check_output_file(tmp_path / name, "--out")  # the tool may write it again
    for name, content in theirs.items():
        path = tmp_path / "theirs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        assert not files.is_own_file(path), name
        with pytest.raises(UserError, match="was not written by this tool"):
            files.check_output_file(path, "--out")
    (tmp_path / "empty.json").write_text("")
    files.check_output_file(tmp_path / "empty.json", "--out")  # an empty file holds nothing to lose


def png(software: str) -> bytes:
    """A 1x1 PNG with a Software text chunk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + chunk(b"tEXt", b"Software\0" + software.encode()) + chunk(b"IDAT", zlib.compress(b"\0\0"))
            + chunk(b"IEND", b""))


def test_save_hotness_may_replace_a_profile_it_saved(tmp_path):
    path = tmp_path / "hot.json"
    HotnessTracker(2, 4, 8.0, np.ones((2, 4))).save(path)
    launch.EngineOptions(policy=launch.PolicyOptions(save_hotness=str(path))).check()


def folder(tmp_path: Path, name: str, files_in: dict[str, str]) -> Path:
    """A complete new folder beside the target, as a writer makes it (marked)."""
    path = tmp_path / name
    path.mkdir()
    for n, text in files_in.items():
        (path / n).write_text(text)
    files.mark(path, files_in)
    return path


def test_a_folder_the_tool_writes_again_keeps_the_users_files_and_drops_only_its_own(tmp_path):
    target = tmp_path / "out"
    files.install_dir(folder(tmp_path, "v1", {"a.txt": "1", "old.txt": "1"}), target)
    (target / "notes.txt").write_text(NOTES)
    (target / "sub").mkdir()
    (target / "sub" / "more.txt").write_text(NOTES)
    files.install_dir(folder(tmp_path, "v2", {"a.txt": "2"}), target)
    assert (target / "a.txt").read_text() == "2" and not (target / "old.txt").exists()
    assert (target / "notes.txt").read_text() == NOTES and (target / "sub" / "more.txt").read_text() == NOTES
    assert files.own_files(target) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left

    mine = user_folder(tmp_path)
    (tmp_path / "target2").mkdir()
    before = snapshot(mine)
    with pytest.raises(UserError, match="holds files this tool did not write"):
        files.install_dir(folder(tmp_path, "v3", {"a.txt": "3"}), mine)
    assert snapshot(mine) == before
    # A user's file under a name the new folder writes is not replaced either.
    (target / "b.txt").write_text(NOTES)
    before = snapshot(target)
    with pytest.raises(UserError, match="b.txt, which this tool did not write"):
        files.install_dir(folder(tmp_path, "v4", {"a.txt": "4", "b.txt": "4"}), target)
    assert snapshot(target) == before


def test_removing_a_tool_folder_leaves_what_the_user_put_in_it(tmp_path):
    path = folder(tmp_path, "entry", {"a.txt": "1"})
    (path / "notes.txt").write_text(NOTES)
    files.remove_own_dir(path)
    assert snapshot(path) == {"notes.txt": NOTES.encode()}
    mine = user_folder(tmp_path)
    files.remove_own_dir(mine)  # no marker: not the tool's
    assert (mine / "notes.txt").read_text() == NOTES


@pytest.fixture(scope="module")
def tiny(moe_checkpoint):
    return loader.load(moe_checkpoint[0], jnp.float32)


def calibrate(path: Path, ckpt, value: float = 1.0) -> None:
    L, E = len(ckpt.config.moe_layers), ckpt.config.num_experts
    floe_calibration.save(path, ckpt, SETTINGS, np.full((L, E), value, np.float32), {}, "text")


SETTINGS = floe_calibration.settings(0.5, 2, 64)


def test_a_calibration_is_written_only_into_a_new_empty_or_own_folder_and_keeps_the_users_files(tmp_path, tiny):
    mine = user_folder(tmp_path)
    before = snapshot(mine)
    with pytest.raises(UserError, match="holds files this tool did not write"):
        calibrate(mine, tiny)
    assert snapshot(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]

    (tmp_path / "empty").mkdir()
    calibrate(tmp_path / "empty", tiny)
    path = tmp_path / "cal"
    calibrate(path, tiny)
    (path / "notes.txt").write_text(NOTES)
    calibrate(path, tiny, 2.0)  # rebuilt in place: the user's file stays
    assert (path / "notes.txt").read_text() == NOTES
    assert floe_calibration.load(path, tiny, SETTINGS).thresholds.max() == 2.0


def test_a_damaged_calibration_a_user_named_is_reported_and_nothing_is_removed(tmp_path, tiny):
    path = tmp_path / "cal"
    calibrate(path, tiny)
    (path / "notes.txt").write_text(NOTES)
    arrays = path / store.ARRAYS
    data = bytearray(arrays.read_bytes())
    data[-1] ^= 0xFF
    arrays.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    with pytest.raises(floe_calibration.DamagedCalibration) as e:
        floe_calibration.load(path, tiny, SETTINGS)
    assert "\n" not in str(e.value) and "scripts/calibrate.py" in str(e.value) and f"--out {path}" in str(e.value)
    assert snapshot(tmp_path) == before


def test_a_damaged_cache_entry_loses_only_what_the_tool_wrote(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAEXQ_CACHE", "1")
    monkeypatch.setenv("DYNAEXQ_CACHE_DIR", str(tmp_path))  # a folder the user also keeps files in
    (tmp_path / "notes.txt").write_text(NOTES)
    source = store.Generated("harm", (1,))
    tree = {"w": np.arange(64, dtype=np.float32)}
    np.testing.assert_array_equal(store.cached(source, "t", {}, lambda: tree)["w"], tree["w"])
    entry = store.entry(source, "t", {}).path
    assert files.own_files(entry) is not None
    (entry / "notes.txt").write_text(NOTES)
    data = bytearray((entry / store.ARRAYS).read_bytes())
    data[-1] ^= 0xFF
    (entry / store.ARRAYS).write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = store.cached(source, "t", {}, lambda: tree)
    np.testing.assert_array_equal(again["w"], tree["w"])
    assert any("damaged" in str(w.message) for w in caught)
    assert (tmp_path / "notes.txt").read_text() == NOTES and (entry / "notes.txt").read_text() == NOTES


def test_an_export_goes_only_into_a_new_empty_or_own_folder_and_keeps_the_users_files(tmp_path):
    cfg = preset.preset_config("qwen3-moe-smoke")
    ckpt = preset.random_checkpoint(cfg, jnp.float32)
    mine = user_folder(tmp_path)
    before = snapshot(mine)
    with pytest.raises(UserError, match="checkpoint folder .* holds files this tool did not write"):
        hf_export.save_checkpoint(mine, cfg, ckpt.params, ckpt.experts, dtype="float32")
    assert snapshot(mine) == before
    out = hf_export.save_checkpoint(tmp_path / "ckpt", cfg, ckpt.params, ckpt.experts, dtype="float32")
    (out / "README.md").write_text(NOTES)
    hf_export.save_checkpoint(out, cfg, ckpt.params, ckpt.experts, dtype="float32")
    assert (out / "README.md").read_text() == NOTES and (out / "config.json").is_file()
    assert json.loads((out / files.MARKER).read_text())["files"] == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]
