"""Synthetic multi-stem music (numpy only), written in the demucs wav layout.

Each track is a few bars of procedural pop: drums (kick = pitched-down sine sweep, snare =
noise burst + tone, hi-hat = high-passed noise clicks) on a tempo grid, a bass line and
chords ("other": pads or plucks) following a progression, and a voice-like melody
("vocals": harmonic source with vibrato and formants, in phrases with rests).

Layouts: 4 stems [drums, bass, other, vocals]; 5 stems [other, kick, vocals, bass, hihat]
with the snare in `other`; 6 stems [drums, bass, other, vocals, guitar, piano] (the
htdemucs_6s layout: a plucked guitar arpeggio and struck piano chords join the parts).
`dset.synth.stems: null` picks the smallest layout that holds the requested sources.
The mixture is the exact sum of the written stems.
`domain` A/B changes tempo, key, timbre, brightness and balance (B is faster and brighter).

    python -m demucs_lora.data.synth OUT --tracks 8 --seconds 6 --seed 0 --domain A --stems 4
"""
import argparse
import hashlib
import json
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf

from demucs_lora.core.errors import ConfigError
from demucs_lora.core.files import atomic_write, atomic_write_text
from demucs_lora.data.instruments import _grid, _drums, _chords, _bass, _other, _piano, _vocals, _peak, _pan

VERSION = 1
LAYOUTS = {4: ["drums", "bass", "other", "vocals"],
           5: ["other", "kick", "vocals", "bass", "hihat"],
           6: ["drums", "bass", "other", "vocals", "guitar", "piano"]}
EXTRA_LEVELS = {"A": dict(guitar=.07, piano=.08), "B": dict(guitar=.09, piano=.07)}
MAJOR, MINOR = [0, 2, 4, 5, 7, 9, 11], [0, 2, 3, 5, 7, 8, 10]
DOMAINS = {
    "A": dict(bpm=(84, 112), root=(40, 47), scale=MINOR, swing=0.12, kick=(0, 8),
              kick_extra=(6, 10, 14), hat_step=2, open_hat=0.0, kick_sweep=(120, 45, 0.26),
              snare_band=(800, 4500), hat_hp=0.28, bass_wave="saw", bass_cut=(280, 500),
              other="pad", voice_mid=(57, 62), voice_tilt=1.5, vibrato=0.25,
              progressions=[[0, 5, 2, 6], [0, 3, 4, 0], [0, 6, 5, 6], [0, 3, 0, 4]],
              levels=dict(kick=.20, snare=.09, hihat=.025, bass=.17, other=.09, vocals=.14)),
    "B": dict(bpm=(128, 168), root=(45, 52), scale=MAJOR, swing=0.0, kick=(0, 4, 8, 12),
              kick_extra=(7, 14), hat_step=1, open_hat=0.35, kick_sweep=(220, 58, 0.14),
              snare_band=(1500, 9000), hat_hp=0.38, bass_wave="square", bass_cut=(700, 1400),
              other="pluck", voice_mid=(64, 70), voice_tilt=0.9, vibrato=0.5,
              progressions=[[0, 4, 5, 3], [0, 3, 4, 3], [5, 3, 0, 4], [0, 5, 3, 4]],
              levels=dict(kick=.15, snare=.12, hihat=.08, bass=.10, other=.15, vocals=.075)),
}
def _balance(rng, parts, levels):
    """In place: each part at its domain level, +-1.5 dB per track."""
    for name, x in parts.items():
        rms = np.sqrt(np.vdot(x, x) / x.size) + 1e-12
        parts[name] = x * (levels[name] / rms * 10 ** (rng.uniform(-1.5, 1.5) / 20))


def synth_track(rng, seconds, samplerate=44100, domain="A", stems=4, channels=2):
    """Render one track: dict stem name -> float32 array (channels, T), plus 'mixture'."""
    if domain not in DOMAINS:
        raise ConfigError(f"dset.synth.domain={domain!r}: expected one of {sorted(DOMAINS)}")
    if stems not in LAYOUTS:
        raise ConfigError(f"dset.synth.stems={stems!r}: expected one of {sorted(LAYOUTS)}")
    if channels not in (1, 2):
        raise ConfigError(f"dset.channels={channels!r}: the synthetic data has 1 or 2 channels")
    d, sr = DOMAINS[domain], int(samplerate)
    n = int(round(seconds * sr))
    grid = _grid(rng, d, seconds, sr)
    root, chords = _chords(rng, d, grid)
    drums = _drums(rng, d, grid, n, sr)
    parts = {
        "kick": _pan(drums["kick"], 0.0),
        "snare": _pan(drums["snare"], rng.uniform(-0.15, 0.15)),
        "hihat": _pan(drums["hihat"], rng.choice([-1, 1]) * rng.uniform(0.2, 0.5)),
        "bass": _pan(_bass(rng, d, grid, chords, n, sr), 0.0),
        "other": _other(rng, d, grid, chords, n, sr),
        "vocals": _pan(_vocals(rng, d, grid, chords, root, n, sr), rng.uniform(-0.1, 0.1)),
    }
    _balance(rng, parts, d["levels"])
    if stems == 6:                              # drawn last: the 4/5-stem tracks stay the same
        extra = {"guitar": _other(rng, dict(d, other="pluck"), grid,
                                  [[m - 12 for m in c] for c in chords], n, sr),
                 "piano": _piano(rng, d, grid, chords, n, sr)}
        _balance(rng, extra, EXTRA_LEVELS[domain])
        parts.update(extra)
    if stems == 6:
        out = {"drums": parts["kick"] + parts["snare"] + parts["hihat"], "bass": parts["bass"],
               "other": parts["other"], "vocals": parts["vocals"], "guitar": parts["guitar"],
               "piano": parts["piano"]}
    elif stems == 4:
        out = {"drums": parts["kick"] + parts["snare"] + parts["hihat"], "bass": parts["bass"],
               "other": parts["other"], "vocals": parts["vocals"]}
    else:
        out = {"other": parts["other"] + parts["snare"], "kick": parts["kick"],
               "vocals": parts["vocals"], "bass": parts["bass"], "hihat": parts["hihat"]}
    if channels == 1:
        out = {k: v.mean(0, keepdims=True) for k, v in out.items()}
    mix = np.zeros_like(out["bass"])
    for v in out.values():
        mix += v
    peak = max(_peak(v) for v in [mix, *out.values()])
    gain = min(1.0, 0.89 / max(peak, 1e-9))
    out = {k: (v * gain).astype(np.float32) for k, v in out.items()}
    mix[:] = 0                                  # the mixture is the sum of the written stems
    for v in out.values():
        mix += v
    mix = mix.astype(np.float32)
    out["mixture"] = mix
    return out


def _track_rng(seed, domain, split, index):
    return np.random.default_rng(np.random.SeedSequence(
        [int(seed), ord(domain[0]), zlib.crc32(split.encode()), int(index), VERSION]))


def default_splits(tracks):
    return {"train": int(tracks), "valid": max(1, tracks // 4), "test": max(1, tracks // 4)}


def generate_dataset(root, tracks=8, seconds=6.0, seed=0, domain="A", stems=4,
                     samplerate=44100, splits=None, channels=2, progress=False):
    """Write root/{split}/trackNNN/{mixture,STEM}.wav; returns root. Deterministic per seed.

    `splits` maps split -> number of tracks (default: `tracks` train, tracks//4 valid/test).
    Track i of a split is the same whatever the other splits are.
    """
    root = Path(root)
    splits = default_splits(tracks) if splits is None else dict(splits)
    names = LAYOUTS[stems] if stems in LAYOUTS else None
    total = sum(splits.values())
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=f"synth {domain} x{total}", unit="track", leave=False)
    for split, count in splits.items():
        for i in range(int(count)):
            audio = synth_track(_track_rng(seed, domain, split, i), seconds, samplerate,
                                domain, stems, channels)
            folder = root / split / f"track{i:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for name in ["mixture"] + names:
                atomic_write(folder / f"{name}.wav", lambda tmp, data=audio[name].T: sf.write(
                    tmp, data, int(samplerate), format="WAV", subtype="FLOAT"))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    info = dict(version=VERSION, seconds=seconds, seed=seed, domain=domain, stems=stems,
                samplerate=samplerate, channels=channels, splits=splits, sources=names)
    atomic_write_text(root / "synth.json", json.dumps(info, indent=1))
    return root


def choose_layout(stems, sources, residual_source=None):
    """dset.synth.stems, or (null) the smallest layout holding every source (a spelling
    such as 'vocal' for 'vocals' counts; 4 when none does: the error names the sources)."""
    from demucs_lora.core.sources import spelling_of
    if stems is not None:
        return int(stems)
    wanted = [s for s in sources if s != residual_source]
    for n in sorted(LAYOUTS):
        if all(w in LAYOUTS[n] or spelling_of(w, LAYOUTS[n]) for w in wanted):
            return n
    return 4


def synth_params(cfg_dset, sources=None, residual_source=None):
    """The generation parameters of a `dset` config (its `synth` block + rate/channels)."""
    s = cfg_dset["synth"]
    stems = choose_layout(s.get("stems"), sources or [], residual_source)
    return dict(version=VERSION, seconds=float(s["seconds"]), seed=int(s["seed"]),
                domain=str(s["domain"]), stems=stems,
                splits={"train": int(s["tracks"]), "valid": int(s["valid_tracks"]),
                        "test": int(s["test_tracks"])},
                samplerate=int(cfg_dset["samplerate"]), channels=int(cfg_dset["channels"]))


def ensure_synth(cfg_dset, sources, residual_source=None, progress=True, stem_files=None):
    """Generate (once) the synthetic dataset that `cfg_dset` describes; return its root.

    Cached under `<dset.metadata>/synth/<hash of params>/`, written atomically (temporary
    folder, then rename). The files of `sources` (minus `residual_source`; `stem_files`
    maps a source to its file name) must be stems of the layout.
    """
    files = [dict(stem_files or {}).get(s, s) for s in sources]
    residual = dict(stem_files or {}).get(residual_source, residual_source)
    params = synth_params(cfg_dset, files, residual)
    layout = LAYOUTS.get(params["stems"])
    if layout is None:
        raise ConfigError(f"dset.synth.stems={params['stems']}: expected one of "
                          f"{sorted(LAYOUTS)}")
    missing = [s for s in files if s not in layout and s != residual]
    if missing:
        raise ConfigError(
            f"dset.sources={list(sources)}: {missing} not in the synthetic "
            f"{params['stems']}-stem layout: the synthetic files have {layout}; set "
            f"dset.sources=[{', '.join(layout)}] (or a subset with residual_source), another "
            f"dset.synth.stems (layouts: {', '.join(f'{k}: {v}' for k, v in LAYOUTS.items())}),"
            " or give your own data with dset.wav=PATH")
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    base = Path(str(cfg_dset["metadata"])).expanduser()
    if not base.is_absolute():
        base = Path.cwd() / base
    root = base / "synth" / digest
    if (root / "synth.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".tmp-{digest}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate_dataset(tmp, seconds=params["seconds"], seed=params["seed"],
                     domain=params["domain"], stems=params["stems"],
                     samplerate=params["samplerate"], splits=params["splits"],
                     channels=params["channels"], progress=progress)
    try:
        os.rename(tmp, root)
    except OSError:                 # another process won the race: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "synth.json").is_file():
            raise
    return root


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m demucs_lora.data.synth",
                                description="Write a synthetic multi-stem dataset.")
    p.add_argument("out", help="dataset root (OUT/{train,valid,test}/TRACK/*.wav)")
    p.add_argument("--tracks", type=int, default=8, help="train tracks (or --split tracks)")
    p.add_argument("--valid-tracks", type=int, default=None)
    p.add_argument("--test-tracks", type=int, default=None)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domain", choices=sorted(DOMAINS), default="A")
    p.add_argument("--stems", type=int, choices=sorted(LAYOUTS), default=4)
    p.add_argument("--samplerate", type=int, default=44100)
    p.add_argument("--channels", type=int, choices=[1, 2], default=2)
    p.add_argument("--split", default=None, help="write only this split, with --tracks tracks")
    args = p.parse_args(argv)
    if args.split:
        splits = {args.split: args.tracks}
    else:
        splits = default_splits(args.tracks)
        if args.valid_tracks is not None:
            splits["valid"] = args.valid_tracks
        if args.test_tracks is not None:
            splits["test"] = args.test_tracks
    begin = time.perf_counter()
    root = generate_dataset(args.out, args.tracks, args.seconds, args.seed, args.domain,
                            args.stems, args.samplerate, splits, args.channels, progress=True)
    n = sum(splits.values())
    elapsed = time.perf_counter() - begin
    print(f"wrote {n} tracks x {args.seconds:g} s ({LAYOUTS[args.stems]}) to {root} "
          f"in {elapsed:.1f} s ({n * args.seconds / max(elapsed, 1e-9):.0f}x real time)")


if __name__ == "__main__":
    main()
