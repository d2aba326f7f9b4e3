"""`train.xp_folder_in`: where `dora run ARGS` in a folder writes, whatever folder the
entry point was first imported from (Dora resolves dora.dir against that cwd)."""
import os
from pathlib import Path


def test_xp_folder_follows_the_workdir_not_the_import_cwd(tmp_path, monkeypatch):
    from demucs_lora.train import main, xp_folder_in
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = ["epochs=1", "htdemucs.lora_rank=4"]
    sig = main.get_xp(args).sig
    folder = xp_folder_in(args, tmp_path / "work")
    assert folder == tmp_path / "work" / "outputs" / "xps" / sig
    assert Path(os.getcwd()) == elsewhere
    assert xp_folder_in(["epochs=2", "htdemucs.lora_rank=4"], tmp_path).name != sig
