"""The guide's five training commands, as written, through `dora run` on CPU.

Substituted: DATA (a tiny synthetic stem folder) and the model folder (pretrained_repo, a
repo of tiny HTDemucs models under the released names: guide_fixtures.make_repo).
Appended: size-reducing overrides only (one epoch of one batch of 1 s segments).
"""
import hashlib
import json
import shlex

import pytest
from helpers import FOUR, SIX
from omegaconf import OmegaConf

from .dora_helpers import dora, history, xps
from .guide_fixtures import make_data, make_repo

GUIDE = {
    "five_stems": 'dora run -d -f htdemucs continue_from=htdemucs htdemucs.lora_rank=8 '
                  'variant=finetune dset.sources=\'["other", "kick", "vocal", "bass", "hihat"]\' '
                  'dset.wav=DATA optim.lr=5e-5 optim.warmup_steps=500 htdemucs.nfft=4096 '
                  'htdemucs.segment=12',
    "tech_house": "dora run -d -f htdemucs continue_from=htdemucs htdemucs.lora_rank=8 "
                  "variant=finetune dset.wav=DATA optim.lr=1e-4 optim.warmup_steps=1000",
    "signature": "dora run -d -f 955717e8 continue_from=955717e8 htdemucs.lora_rank=4 "
                 "variant=finetune",
    "six_stems": "dora run -d -f htdemucs_6s continue_from=htdemucs_6s htdemucs.lora_rank=8 "
                 "variant=finetune",
    "scratch": "dora run -d model=htdemucs htdemucs.lora_rank=4 htdemucs.lora_alpha=1.0 "
               "htdemucs.channels=48",
}
SMALL = ["epochs=1", "max_batches=1", "batch_size=2", "dset.segment=1", "test.initial=false"]
SMALL_SYNTH = ["dset.synth.tracks=2", "dset.synth.valid_tracks=1", "dset.synth.test_tracks=1",
               "dset.synth.seconds=2"]
NO_GPU = "no GPU visible, running one process on the CPU"


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    root = tmp_path_factory.mktemp("guide")
    return {"repo": make_repo(root), "data5": make_data(root, 5), "data4": make_data(root, 4)}


def _argv(name, data=None):
    """The guide command as a shell would split it, DATA substituted, `dora` dropped."""
    text = GUIDE[name].replace("DATA", str(data)) if data else GUIDE[name]
    return shlex.split(text)[1:]


def _small(argv):
    """SMALL in the command's own spelling: two spellings of one key are refused
    (`htdemucs.segment=12 dset.segment=1`), one spelling twice is "last wins"."""
    if any(a.startswith("htdemucs.segment=") for a in argv):
        return [a.replace("dset.segment=", "htdemucs.segment=") for a in SMALL]
    return SMALL


def _run(cwd, name, guide, data=None, extra=(), check=True):
    cwd.mkdir(exist_ok=True)
    argv = _argv(name, data)
    argv = argv + [f"pretrained_repo={guide['repo']}", *_small(argv), *extra]
    proc = dora(cwd, *argv, check=check)
    return proc, proc.stdout + proc.stderr


def _config(cwd):
    (xp,) = xps(cwd)
    return xp, OmegaConf.to_container(OmegaConf.load(xp / "config.yaml"))


def test_five_stems_from_htdemucs(tmp_path, guide):
    _, out = _run(tmp_path / "run", "five_stems", guide, data=guide["data5"])
    assert NO_GPU in out and "-f htdemucs: not an XP signature" in out
    xp, cfg = _config(tmp_path / "run")
    assert cfg["continue_from"] == "htdemucs" and cfg["htdemucs"]["lora_rank"] == 8
    assert cfg["dset"]["sources"] == ["other", "kick", "vocal", "bass", "hihat"]
    assert cfg["dset"]["stem_files"] == {"vocal": "vocals"}       # the dataset's spelling
    assert cfg["source_init"] == {"kick": "drums", "vocal": "vocals", "hihat": "drums"}
    assert cfg["optim"]["lr"] == 5e-5 and cfg["optim"]["warmup_steps"] == 500
    assert cfg["htdemucs"]["nfft"] == 4096 and cfg["htdemucs"]["hop_length"] == 1024
    assert cfg["htdemucs"]["channels"] == 8 and cfg["htdemucs"]["t_layers"] == 1  # the base's
    log = (xp / "train.log").read_text()
    for line in ("source kick: new stem, head from drums (default taxonomy)",
                 "source vocal: not a source of the base, but a spelling of its 'vocals'",
                 "source vocal: the dataset has vocals.wav and no vocal.wav", NO_GPU):
        assert line in log, line
    assert "valid_nsdr_vocal" in history(xp)[0]
    # An architecture key that differs from the base: refused before any data is read.
    proc, out = _run(tmp_path / "bad", "five_stems", guide, data=guide["data5"],
                     extra=["htdemucs.nfft=2048"], check=False)
    assert proc.returncode == 2  # a config error (README: exit status)
    assert "htdemucs.nfft=2048 but the base htdemucs has nfft=4096: its weights fix the " \
           "architecture" in out


def test_tech_house_finetune_on_own_stems(tmp_path, guide):
    _run(tmp_path / "run", "tech_house", guide, data=guide["data4"])
    xp, cfg = _config(tmp_path / "run")
    assert cfg["dset"]["sources"] == FOUR                      # the base's sources
    assert cfg["dset"]["wav"] == str(guide["data4"])
    assert cfg["optim"]["lr"] == 1e-4 and cfg["optim"]["warmup_steps"] == 1000
    assert len(history(xp)) == 1
    (model,) = guide["repo"].glob("955717e8-*.th")       # train.log names the base's file
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    assert f"base htdemucs: {model} from pretrained_repo {guide['repo']} (sha256 {sha})" in \
        (xp / "train.log").read_text()
    # The same command on a 5-stem folder: the missing stem names what the files have.
    proc, out = _run(tmp_path / "five", "tech_house", guide, data=guide["data5"], check=False)
    assert proc.returncode == 1
    assert "your files have bass, hihat, kick, other, vocals; set dset.sources=[bass, " \
           "hihat, kick, other, vocals]" in out


def test_signature_name_stays_a_string_on_synthetic_data(tmp_path, guide):
    _, out = _run(tmp_path, "signature", guide, extra=SMALL_SYNTH)
    assert "EMBEDDED SYNTHETIC DATA" in out
    xp, cfg = _config(tmp_path)
    assert cfg["continue_from"] == "955717e8" and cfg["htdemucs"]["lora_rank"] == 4
    assert cfg["dset"]["sources"] == FOUR and cfg["dset"]["wav"] is None
    log = (xp / "train.log").read_text()
    assert "EMBEDDED SYNTHETIC DATA" in log and "dset.sources not set: the base's" in log


def test_six_stems_keep_guitar_and_piano(tmp_path, guide):
    _run(tmp_path, "six_stems", guide, extra=SMALL_SYNTH)
    xp, cfg = _config(tmp_path)
    assert cfg["dset"]["sources"] == SIX
    header = json.loads((xp / "lora_best.json").read_text())
    assert header["sources"] == SIX
    assert {"valid_nsdr_guitar", "valid_nsdr_piano"} <= set(history(xp)[0])


def test_lora_from_scratch_is_refused_then_opted_in(tmp_path, guide):
    proc, _ = _run(tmp_path / "refused", "scratch", guide, extra=SMALL_SYNTH, check=False)
    assert proc.returncode == 2  # a config error (README: exit status)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "continue_from" in errors[0]
    assert not list((tmp_path / "refused").glob("outputs/xps/*/checkpoint.th"))
    _run(tmp_path / "opt_in", "scratch", guide,
         extra=[*SMALL_SYNTH, "lora_without_base=true"])
    xp, cfg = _config(tmp_path / "opt_in")
    assert cfg["htdemucs"]["channels"] == 48 and cfg["htdemucs"]["lora_alpha"] == 1.0
    assert "frozen" in (xp / "train.log").read_text() and \
        "RANDOMLY INITIALISED" in (xp / "train.log").read_text()


def test_dset_wav_group_and_unknown_f(tmp_path, guide):
    """`dset=wav dset.wav=PATH` (a required ??? key) runs; `-f` of nothing says what it
    takes."""
    proc = dora(tmp_path, "run", "dset=wav", f"dset.wav={guide['data4']}",
                "continue_from=htdemucs", f"pretrained_repo={guide['repo']}",
                "misc.show=true", *SMALL)
    (xp,) = xps(tmp_path)
    assert OmegaConf.load(xp / "config.yaml").dset.wav == str(guide["data4"])
    proc = dora(tmp_path, "run", "-f", "nothing", check=False)
    assert proc.returncode == 2  # a config error (README: exit status)
    assert "-f takes an XP signature (dora run -f SIG) or a model" in proc.stderr
    assert "Traceback" not in proc.stderr
