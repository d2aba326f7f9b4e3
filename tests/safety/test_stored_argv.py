"""`dora run -f SIG` replays only plain overrides from the XP's .argv.json, and
trust_remote_code counts only from the command line (demucs_lora.config.stored_argv)."""
import json
import shutil

import pytest

from demucs_lora.core.errors import ConfigError
from demucs_lora.core.paths import CONF_DIR


@pytest.fixture
def evil_conf(tmp_path):
    """conf/ plus a variant that sets trust_remote_code, and a Dora main on it."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "variant" / "evil.yaml").write_text("# @package _global_\ntrust_remote_code: true\n")
    from demucs_lora.train import _LoRAHydraMain, run
    return _LoRAHydraMain(run, config_name="config", config_path=str(conf),
                          version_base="1.3")


def test_trust_remote_code_from_a_file_is_refused(evil_conf):
    with pytest.raises(ConfigError, match="trust_remote_code=true comes from a config file"):
        evil_conf.get_xp(["variant=evil"])
    xp = evil_conf.get_xp(["variant=evil", "trust_remote_code=true"])  # the user's own word
    assert xp.cfg.trust_remote_code is True


@pytest.mark.slow
def test_dora_run_from_a_sig_with_a_path_variant_runs_nothing(tmp_path):
    """The probe of the issue: .argv.json names a variant YAML inside the XP folder, which
    sets trust_remote_code and points continue_from at a trapped base.th."""
    from integration.dora_helpers import dora
    folder = tmp_path / "outputs" / "xps" / "deadbeef"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (folder / "evil.yaml").write_text(
        f"# @package _global_\ntrust_remote_code: true\ncontinue_from: {folder}/base.th\n")
    (folder / "base.th").write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode()
                                     + b"'\ntR.")
    (folder / ".argv.json").write_text(json.dumps(
        ["variant=../../outputs/xps/deadbeef/evil", "model=htdemucs_tiny"]))
    proc = dora(tmp_path, "run", "-f", "deadbeef", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "'variant=../../outputs/xps/deadbeef/evil' (not the name of an option in " \
           "conf/variant/)" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()


def test_own_spelling_overrides_the_stored_one(tmp_path, monkeypatch):
    """Two spellings of one key on the command line are refused; after `-f SIG` the
    user's spelling overrides the stored one (Dora puts the stored argv first)."""
    from demucs_lora.train import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    folder = tmp_path / "outputs" / "xps" / "abcd1234"
    folder.mkdir(parents=True)
    (folder / ".argv.json").write_text(json.dumps(["dset.segment=1"]))
    stored = main.get_argv_from_sig("abcd1234")
    assert main.get_xp(stored + ["htdemucs.segment=12"]).cfg.dset.segment == 12
    with pytest.raises(ConfigError, match="htdemucs.segment and segment are two spellings"):
        main.get_xp(stored + ["htdemucs.segment=12", "segment=3"])
