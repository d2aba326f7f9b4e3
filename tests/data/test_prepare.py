"""`python -m tools.prepare_dataset SRC OUT`: DAW exports with mismatched rates, channels and
lengths, part folders and no mixture become a dataset tools.verify_dataset accepts."""
import hashlib

import numpy as np
import pytest
import soundfile as sf

from demucs_lora.commands.prepare_dataset import main as prepare
from demucs_lora.commands.verify_dataset import main as verify

SR = 8000


def _write(path, seconds, rate, channels, seed, fmt="wav"):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).standard_normal((int(seconds * rate), channels)) * 0.05
    sf.write(str(path.with_suffix(f".{fmt}")), data.astype(np.float32), rate,
             subtype="PCM_24" if fmt == "flac" else "FLOAT")


def exports(src):
    """Two tracks as a DAW exports them: other rates, mono parts, uneven lengths, FLAC."""
    for i, name in enumerate(["song_a", "song_b"]):
        track = src / name
        _write(track / "drums/kick", 1.0, 16000, 1, 10 * i)          # mono, 16 kHz
        _write(track / "drums/snare", 0.9, SR, 2, 10 * i + 1)         # shorter
        _write(track / "bass", 1.1, 22050, 2, 10 * i + 2, "flac")     # longer, FLAC
        _write(track / "other", 1.0, SR, 1, 10 * i + 3)
        _write(track / "vocals", 1.0, SR, 2, 10 * i + 4)
    return src


def digest(folder):
    return {p.relative_to(folder).as_posix(): (hashlib.sha1(p.read_bytes()).hexdigest(),
                                               p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(tool, capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        tool([str(a) for a in args])
    out = capsys.readouterr()
    return exit_.value.code, out.out + out.err


def test_prepare_then_verify(tmp_path, capsys):
    src, out = exports(tmp_path / "src"), tmp_path / "out"
    before = digest(src)
    code, text = run(prepare, capsys, src, out, f"dset.samplerate={SR}")
    assert code == 0, text
    assert ("song_a/drums/kick.wav + song_a/drums/snare.wav -> train/song_a/drums.wav: "
            "2 parts summed, resampled 16000 -> 8000 Hz, 1 -> 2 channels") in text
    assert "song_a/bass.flac -> train/song_a/bass.wav: resampled 22050 -> 8000 Hz, " \
           "flac -> float WAV\n" in text                 # the longest: the track's length
    assert "song_a/other.wav -> train/song_a/other.wav: 1 -> 2 channels, padded 800 " \
           "frames\n" in text
    assert "(none) -> train/song_a/mixture.wav: written as the sum of the stems" in text
    assert "10 files written, 0 unchanged" in text
    assert digest(src) == before                                      # SRC untouched
    info = sf.info(str(out / "train/song_b/drums.wav"))
    assert (info.samplerate, info.channels, info.frames) == (SR, 2, 1.1 * SR)
    code, text = run(verify, capsys, out, f"dset.samplerate={SR}", "dset.valid_tracks=1",
                     f"dset.metadata={tmp_path / 'm'}", "--no-progress")
    assert code == 0, text
    written = digest(out)
    code, text = run(prepare, capsys, src, out, f"dset.samplerate={SR}")
    assert code == 2 and "is not empty" in text and "--force" in text
    code, text = run(prepare, capsys, src, out, f"dset.samplerate={SR}", "--force")
    assert code == 0 and "0 files written, 10 unchanged" in text
    assert digest(out) == written                                     # idempotent


def test_prepare_trims_to_the_mixture_and_refuses_bad_input(tmp_path, capsys):
    src = exports(tmp_path / "src")
    _write(src / "song_b/mixture", 1.0, SR, 2, 99)
    code, text = run(prepare, capsys, src, tmp_path / "trim", f"dset.samplerate={SR}")
    assert code == 0 and "song_b/bass.flac -> train/song_b/bass.wav: resampled 22050 -> " \
        "8000 Hz, trimmed 800 frames" in text
    assert sf.info(str(tmp_path / "trim/train/song_b/drums.wav")).frames == SR
    code, text = run(prepare, capsys, src, src / "out")
    assert code == 2 and "overlap" in text
    (src / "song_a/vocals.wav").write_bytes(b"RIFF" + b"\x00" * 64)
    code, text = run(prepare, capsys, src, tmp_path / "out", f"dset.samplerate={SR}")
    assert code == 1 and f"cannot read {src / 'song_a/vocals.wav'}" in text
    assert len(text.strip().splitlines()) == 1
