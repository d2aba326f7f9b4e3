"""`dora run` on a dataset as users hold it: FLAC stems without a mixture, drums as a folder
of parts, only a train/ folder (hold-out), with gradient accumulation; and a bad
`dset.musdb` stopping the run with a one-line error before anything is built."""
import numpy as np
import soundfile as sf

from .dora_helpers import QUICK, dora, history, xps

SR = 16000


def _flac(path, seconds, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).standard_normal((int(seconds * SR), 2)) * 0.05
    sf.write(str(path), data.astype(np.float32), SR, subtype="PCM_24")


def test_flac_parts_no_mixture_hold_out_with_accumulation(tmp_path):
    root = tmp_path / "exports"
    for i in range(3):
        track = root / "train" / f"song{i}"
        for j, name in enumerate(["drums/kick", "drums/snare", "bass", "other", "vocals"]):
            _flac(track / f"{name}.flac", 3.0, 10 * i + j)
    dora(tmp_path, "run", *QUICK, f"dset.wav={root}", f"dset.samplerate={SR}",
         "dset.valid_tracks=1", "optim.accumulate=2", "test.initial=false", timeout=600)
    (xp,) = xps(tmp_path)
    assert [h["epoch"] for h in history(xp)] == [1, 2]
    assert all(h["train_batches"] == 1 for h in history(xp))    # 2 batches = 1 step
    log = (xp / "train.log").read_text()
    assert "valid tracks (1): song" in log
    assert "mixture = sum of the stems (no mixture file, dset.mixture=auto) in 3 tracks" in log
    assert "formats: flac 15 files" in log


def test_musdb_without_train_stops_before_any_model(tmp_path):
    (tmp_path / "musdb" / "test").mkdir(parents=True)
    proc = dora(tmp_path, "run", *QUICK, f"dset.musdb={tmp_path / 'musdb'}", check=False,
                timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert "DatasetError" in lines[0] and "no train/ folder" in lines[0]
    assert not list(tmp_path.glob("outputs/xps/*/checkpoint.th"))
