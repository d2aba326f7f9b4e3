"""A wheel (not only the editable checkout) carries conf/ and the assets where the package
reads them, so an installed `demucs-lora-test` composes its config."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_wheel_ships_conf_and_assets_next_to_the_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "setup.py", src)
    for folder in ("conf", "demucs_lora"):          # a copy: no build/ in the checkout
        shutil.copytree(REPO / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    confs = {f"conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert confs <= names and "demucs_lora/assets/base_tiny_A.th" in names
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    code = ("from demucs_lora.config.compose import compose; "
            "print(compose(['dset=wav', 'dset.wav=/x']).dset.segment)")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    assert out.split()[-1] == "7.8"
