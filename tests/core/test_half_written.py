"""Nothing is ever half-written: file groups are all-or-nothing (the header last, torn
pairs detected), killed writes leave only temps that the next run removes, a full or
read-only disk is one line naming the file, and a run resumes exactly once space is back."""
import errno
import json
import os
import subprocess
import uuid

import pytest
import torch

import solver_helpers
from solver_helpers import make_solver
from demucs_lora.core import files
from demucs_lora.core.errors import AdapterMismatch, DiskWriteError

_threads = pytest.fixture(autouse=True)(solver_helpers.one_thread)


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder):
    """Fill the file system of `folder`; returns the filler to delete."""
    filler = folder / f"filler-{uuid.uuid4().hex[:6]}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_group_write_is_all_or_nothing(tmp_path):
    first, second = tmp_path / "a.bin", tmp_path / "b.json"

    def boom(tmp):
        raise RuntimeError("writer failed")
    with pytest.raises(RuntimeError):
        files.atomic_write_group([(first, lambda t: open(t, "w").write("a")), (second, boom)])
    assert not first.exists() and not second.exists()
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("killed_at", [0, 1])
def test_a_kill_between_renames_is_a_torn_pair_and_temps_are_cleaned(tmp_path, monkeypatch,
                                                                      killed_at):
    from solver_helpers import lora, tiny_base
    from demucs_lora.lora.adapter_file import read_adapter
    from demucs_lora.lora.state import save_adapter
    model = lora(tiny_base())
    save_adapter(model, tmp_path / "ad", xp="v1")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    real, calls = os.replace, {"n": 0}

    def dying_replace(src, dst):
        if calls["n"] == killed_at:
            raise KeyboardInterrupt("killed")  # like a kill: nothing after runs
        calls["n"] += 1
        return real(src, dst)
    monkeypatch.setattr(files.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path / "ad", xp="v2")
    monkeypatch.setattr(files.os, "replace", real)
    if killed_at == 0:  # nothing renamed: the old pair is whole
        assert read_adapter(tmp_path / "ad")[0]["xp"] == "v1"
    else:  # new tensors beside the old header: detected, never mixed
        with pytest.raises(AdapterMismatch, match="torn"):
            read_adapter(tmp_path / "ad")
    assert list(tmp_path.glob(".*.tmp"))
    removed = files.remove_stale_temps(tmp_path)
    assert removed and not list(tmp_path.glob(".*.tmp"))


def test_torn_initial_validation_is_recomputed(tmp_path, monkeypatch):
    folder = tmp_path / "xp"
    (folder / "validation").mkdir(parents=True)
    (folder / "validation" / "epoch_000.json").write_text("")  # a disk that filled up
    solver = make_solver(monkeypatch, folder, "epochs=1", "test.initial=true")
    history = solver.run()
    assert "valid_initial_nsdr" in history[0]
    assert "valid_initial_nsdr" in json.loads((folder / "validation" /
                                               "epoch_000.json").read_text())


def test_full_disk_is_one_line_naming_the_file(tmpfs):
    fill(tmpfs)
    target = tmpfs / "checkpoint.th"
    for write in (lambda: files.atomic_write_text(tmpfs / "epoch_000.json", "x" * 100000),
                  lambda: files.atomic_write(target, lambda tmp: torch.save(
                      torch.zeros(300000), tmp))):
        with pytest.raises(DiskWriteError) as info:
            write()
        assert "No space left on device" in str(info.value)
        assert "\n" not in str(info.value)
    assert str(target) in str(info.value)
    assert not list(tmpfs.glob(".*.tmp"))


def test_read_only_folder_is_one_line(tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(DiskWriteError, match="Read-only file system") as info:
        files.atomic_write_text(tmpfs / "config.yaml", "a: 1")
    assert str(tmpfs / "config.yaml") in str(info.value)


def test_disk_full_mid_run_then_resume_is_exact(tmp_path, tmpfs, monkeypatch):
    from demucs_lora.training import solver as solver_module
    reference = make_solver(monkeypatch, tmp_path / "ref", "epochs=2").run()
    folder = tmpfs / "xp"
    solver = make_solver(monkeypatch, folder, "epochs=2")
    real_save, filler = solver_module.atomic_torch_save, {}

    def save_then_fill(obj, path):  # the disk fills up right after epoch 1's checkpoint
        real_save(obj, path)
        if path.name == "checkpoint.th" and not filler:
            filler["path"] = fill(tmpfs)
    monkeypatch.setattr(solver_module, "atomic_torch_save", save_then_fill)
    with pytest.raises(DiskWriteError, match="No space left on device") as info:
        solver.run()
    assert str(folder) in str(info.value)
    monkeypatch.setattr(solver_module, "atomic_torch_save", real_save)
    filler["path"].unlink()
    resumed = make_solver(monkeypatch, folder, "epochs=2").run()
    for ref, res in zip(reference, resumed):
        for key in ref:
            if "seconds" not in key:
                assert res[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key


def test_read_only_metadata_cache_warns_and_continues(tmp_path, monkeypatch, caplog):
    from demucs_lora.data import stems
    from demucs_lora.data.synth import generate_dataset
    root = generate_dataset(tmp_path / "ds", seconds=0.3, splits={"train": 1, "valid": 1})

    def read_only(*args):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(stems, "save_cache", read_only)
    meta = stems.build_metadata(root, ["drums", "bass", "other", "vocals"],
                                tmp_path / "meta")
    assert len(meta["train"]) == 1 and "continuing without it" in caplog.text
