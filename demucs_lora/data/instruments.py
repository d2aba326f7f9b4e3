"""Instrument voices of the synthetic generator (numpy only): drums, bass, chords, voice.

Each takes a numpy Generator, the domain's parameters `d` (synth.DOMAINS) and the tempo
grid, and returns float arrays; synth.py mixes them into stems and writes the tracks.
"""
import numpy as np

VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010],
                   [570, 840, 2410], [300, 870, 2240], [660, 1720, 2410]], dtype=float)


def _midi_hz(m):
    return 440.0 * 2.0 ** ((np.asarray(m, dtype=float) - 69) / 12)


def _harmonics(phase, amps):
    """sum_k amps[k-1] * sin(k * phase), float32, by the Chebyshev recurrence (no sin per k)."""
    phase = np.mod(phase, 2 * np.pi).astype(np.float32)
    amps = [a.astype(np.float32) if isinstance(a, np.ndarray) else np.float32(a) for a in amps]
    out = np.zeros(np.broadcast_shapes(phase.shape, *[np.shape(a) for a in amps]), np.float32)
    prev, cur = np.zeros_like(phase), np.sin(phase)
    two_cos = 2 * np.cos(phase)
    tmp = np.empty_like(out)
    for amp in amps:
        if np.ndim(amp) == 0 and amp == 0:
            break
        out += np.multiply(amp, cur, out=tmp)
        nxt = np.multiply(two_cos, cur)
        nxt -= prev
        prev, cur = cur, nxt
    return out.astype(np.float64)


def _fft_band(x, sr, lo=0.0, hi=None):
    """Band-pass x (last axis) with smooth 1st-order-like edges in the frequency domain."""
    spec = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(x.shape[-1], 1 / sr)
    gain = np.ones_like(freqs)
    if lo > 0:
        gain *= 1 / np.sqrt(1 + (lo / np.maximum(freqs, 1e-3)) ** 4)
    if hi is not None:
        gain *= 1 / np.sqrt(1 + (freqs / hi) ** 4)
    return np.fft.irfft(spec * gain, n=x.shape[-1])


def _add(out, sample, start):
    start = int(start)
    if start >= out.shape[-1]:
        return
    stop = min(out.shape[-1], start + sample.shape[-1])
    out[..., start:stop] += sample[..., :stop - start]


def _grid(rng, d, seconds, sr):
    bpm = rng.uniform(*d["bpm"])
    step = 60 / bpm / 4
    steps = int(np.ceil(seconds / step)) + 1
    times = np.arange(steps) * step
    times[1::2] += d["swing"] * step                      # shuffle the off 16ths
    times += rng.normal(0, 0.003, steps)                    # humanize
    return dict(bpm=bpm, step=step, n_steps=steps, onsets=np.maximum(times, 0) * sr)


def _drum_samples(rng, d, sr):
    t = lambda dur: np.arange(int(dur * sr)) / sr        # noqa: E731
    f0, f1, decay = d["kick_sweep"]
    tk = t(0.5)
    freq = f1 + (f0 - f1) * np.exp(-tk / 0.035)
    kick = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-tk / decay) * (1 - np.exp(-tk / 1e-3))
    kick += 0.25 * rng.standard_normal(tk.size) * np.exp(-tk / 0.003) * (d["hat_step"] == 1)
    ts = t(0.3)
    lo, hi = d["snare_band"]
    snares = []
    for _ in range(3):
        noise = _fft_band(rng.standard_normal(ts.size), sr, lo, min(hi, 0.45 * sr))
        noise /= np.abs(noise).max() + 1e-9
        tone = np.sin(2 * np.pi * 185 * ts) + 0.5 * np.sin(2 * np.pi * 330 * ts)
        snares.append(noise * np.exp(-ts / 0.07) + 0.6 * tone * np.exp(-ts / 0.045))
    hats = []
    for dur in [0.06] * 3 + [0.3]:
        th = t(dur)
        noise = _fft_band(rng.standard_normal(th.size), sr, d["hat_hp"] * sr)
        hats.append(noise / (np.abs(noise).max() + 1e-9) * np.exp(-th / (dur / 4)))
    return kick, snares, hats


def _drums(rng, d, grid, n, sr):
    """Kick, snare and hi-hat parts (mono) from a random one-bar pattern with variations."""
    kick_s, snares, hats = _drum_samples(rng, d, sr)
    kick_p = np.zeros(16)
    kick_p[list(d["kick"])] = 1
    kick_p[[s for s in d["kick_extra"] if rng.random() < 0.4]] = 0.8
    parts = {name: np.zeros(n) for name in ("kick", "snare", "hihat")}
    for i, onset in enumerate(grid["onsets"]):
        pos, fill = i % 16, (i // 16) % 4 == 3
        if kick_p[pos] or (fill and pos == 14 and rng.random() < 0.5):
            _add(parts["kick"], kick_s * rng.uniform(0.8, 1.0), onset)
        if pos in (4, 12) or (rng.random() < (0.25 if fill else 0.06)):
            vel = 1.0 if pos in (4, 12) else rng.uniform(0.2, 0.5)
            _add(parts["snare"], snares[rng.integers(3)] * vel, onset)
        if pos % d["hat_step"] == 0:
            open_hat = pos % 4 == 2 and rng.random() < d["open_hat"]
            sample = hats[3] if open_hat else hats[rng.integers(3)]
            _add(parts["hihat"], sample * (1.0 if pos % 4 == 0 else rng.uniform(0.45, 0.8)), onset)
    return parts


def _chords(rng, d, grid):
    """Per bar: chord tones (midi) of a diatonic triad from the track's progression."""
    root = rng.integers(*d["root"])
    scale = d["scale"]
    prog = d["progressions"][rng.integers(len(d["progressions"]))]
    bars = grid["n_steps"] // 16 + 1
    chords = []
    for b in range(bars):
        deg = prog[b % len(prog)]
        chords.append([root + scale[(deg + j) % 7] + 12 * ((deg + j) // 7) for j in (0, 2, 4)])
    return root, chords


def _note(freq, dur_s, sr, amps, env, bright_decay=0.0):
    """One additive note: harmonic amplitudes `amps` (cut at Nyquist), envelope fn of t."""
    tt = np.arange(int(dur_s * sr)) / sr
    k = np.arange(1, len(amps) + 1)
    amps = np.where(k * freq < 0.45 * sr, amps, 0.0)
    if bright_decay:
        amps = [a * np.exp(-tt * bright_decay * kk) for a, kk in zip(amps, k)]
    return _harmonics(2 * np.pi * freq * tt, list(amps)) * env(tt)


def _bass(rng, d, grid, chords, n, sr):
    out = np.zeros(n)
    rhythm = [0, 2, 3, 6, 8, 10, 11, 14] if d["hat_step"] == 2 else [0, 2, 4, 6, 8, 10, 12, 14]
    rhythm = [s for s in rhythm if s in (0, 8) or rng.random() < 0.7]
    k = np.arange(1, 25)
    raw = 1 / k if d["bass_wave"] == "saw" else np.where(k % 2 == 1, 1 / k, 0.0)
    starts = [i for i in range(grid["n_steps"]) if i % 16 in rhythm]
    for j, i in enumerate(starts):
        nxt = starts[j + 1] if j + 1 < len(starts) else i + 2
        dur = (nxt - i) * grid["step"] * rng.uniform(0.75, 0.95)
        midi = chords[i // 16][0] - 12 + (7 if rng.random() < 0.15 else 0)
        freq = _midi_hz(midi)
        cut = rng.uniform(*d["bass_cut"])
        amps = raw / np.sqrt(1 + (k * freq / cut) ** 4)
        env = lambda t, dur=dur: np.minimum(t / 0.005, 1) * np.clip((dur - t) / 0.02, 0, 1)  # noqa
        _add(out, _note(freq, dur, sr, amps, env), grid["onsets"][i])
    return out


def _other(rng, d, grid, chords, n, sr):
    out = np.zeros((2, n))
    bar = 16 * grid["step"]
    k = np.arange(1, 21)
    for b, chord in enumerate(chords):
        onset = b * 16
        if onset >= grid["n_steps"]:
            break
        if d["other"] == "pad":
            amps = 1 / k[:8] ** 2
            def env(t):                                       # slow attack, short release
                return np.minimum(t / (0.3 * bar), 1) * np.exp(-np.maximum(t - bar, 0) / 0.15)
            for j, m in enumerate(chord + [chord[0] + 12]):
                note = _note(_midi_hz(m + rng.uniform(-0.08, 0.08)), bar + 0.5, sr, amps, env)
                pan = 0.2 + 0.6 * (j % 2)                       # spread the voices: a wide pad
                _add(out, np.stack([note * (1 - pan), note * pan]) * 2, grid["onsets"][onset])
        else:
            tones = [m + 12 for m in chord] + [chord[0] + 24]
            for s in range(0, 16, 2):
                i = onset + s
                if i >= grid["n_steps"] or rng.random() < 0.15:
                    continue
                m = tones[(s // 2) % len(tones)] if rng.random() < 0.8 else tones[rng.integers(4)]
                env = lambda t: np.minimum(t / 0.002, 1) * np.exp(-t / 0.22)  # noqa: E731
                note = _note(_midi_hz(m), 0.9, sr, 1 / k, env, bright_decay=1.5)
                pan = rng.uniform(0.25, 0.75)
                _add(out, np.stack([note * (1 - pan), note * pan]) * 2, grid["onsets"][i])
    return out


def _piano(rng, d, grid, chords, n, sr):
    """Struck chords (a hammer click, bright attack, decaying harmonics) on beats 1 and 3."""
    out = np.zeros((2, n))
    k = np.arange(1, 16)
    amps = 1 / k ** 1.3
    env = lambda t: np.minimum(t / 0.003, 1) * np.exp(-t / 0.6)  # noqa: E731
    for b, chord in enumerate(chords):
        for s in (0, 8):
            i = b * 16 + s
            if i >= grid["n_steps"] or rng.random() < 0.2:
                continue
            vel = rng.uniform(0.7, 1.0)
            for j, m in enumerate([chord[0] - 12] + chord):
                note = _note(_midi_hz(m + 12), 1.2, sr, amps, env, bright_decay=2.5) * vel
                pan = 0.35 + 0.1 * j
                _add(out, np.stack([note * (1 - pan), note * pan]) * 2, grid["onsets"][i])
    return out


def _melody(rng, d, grid, chords, root):
    """Note list (start_step, n_steps, midi, vowel) in phrases separated by rests."""
    scale = np.array([root + 12 * o + s for o in range(-1, 6) for s in d["scale"]])
    lo, hi = d["voice_mid"]
    idx = int(np.argmin(np.abs(scale - rng.integers(lo, hi + 1))))
    notes, i = [], int(rng.integers(0, 4)) * 2
    while i < grid["n_steps"]:
        for _ in range(rng.integers(3, 9)):
            length = int(rng.choice([2, 2, 4, 4, 6, 8]))
            idx = int(np.clip(idx + rng.choice([-2, -1, -1, 0, 1, 1, 2]), 7, len(scale) - 8))
            if i % 8 == 0 and rng.random() < 0.6:          # chord tones on strong beats
                tones = {c % 12 for c in chords[min(i // 16, len(chords) - 1)]}
                near = [j for j in range(idx - 2, idx + 3) if scale[j] % 12 in tones]
                idx = min(near, key=lambda j: abs(j - idx)) if near else idx
            while scale[idx] < lo - 5:
                idx += 1
            while scale[idx] > hi + 7:
                idx -= 1
            notes.append((i, length, scale[idx], int(rng.integers(len(VOWELS)))))
            i += length
        i += int(rng.choice([2, 4, 6, 8]))
    return notes


def _smooth(x, width):
    width = max(1, int(width))
    c = np.cumsum(np.concatenate([np.repeat(x[:1], width), x]))
    return (c[width:] - c[:-width]) / width


def _vocals(rng, d, grid, chords, root, n, sr, block=32):
    """Voice-like melody: f0 with portamento and vibrato, harmonics shaped by formants."""
    nb = n // block + 1
    ctl_sr = sr / block
    midi, vowel = np.full(nb, np.nan), np.zeros((nb, 3))
    amp, since = np.zeros(nb), np.zeros(nb)
    on_c = grid["onsets"] / block
    for start, length, m, v in _melody(rng, d, grid, chords, root):
        end = start + length
        if start >= grid["n_steps"]:
            break
        a = int(on_c[start])
        b = min(nb, int(on_c[end]) if end < grid["n_steps"] else nb)
        if a >= b:
            continue
        midi[a:b], vowel[a:b] = m, VOWELS[v] * (1.15 if d["hat_step"] == 1 else 1.0)
        amp[a:b] = np.clip((b - np.arange(a, b)) / (0.06 * ctl_sr), 0, 1) * rng.uniform(0.7, 1)
        since[a:b] = np.arange(b - a) / ctl_sr
    voiced = ~np.isnan(midi)
    if not voiced.any():
        return np.zeros(n)
    midi = np.interp(np.arange(nb), np.flatnonzero(voiced), midi[voiced])
    midi = _smooth(midi, 0.04 * ctl_sr)
    vowel = np.stack([_smooth(vowel[:, j], 0.05 * ctl_sr) for j in range(3)], 1)
    amp = _smooth(amp, 0.03 * ctl_sr)
    rate = rng.uniform(5.0, 6.5)
    vib = np.sin(2 * np.pi * rate * np.arange(nb) / ctl_sr)    # delayed vibrato per note
    vib *= d["vibrato"] * np.minimum(since / 0.4, 1)
    f0 = _midi_hz(midi + vib)                                     # control rate
    phase = 2 * np.pi * np.cumsum(np.repeat(f0, block)[:nb * block]) / sr
    phase = phase.reshape(nb, block)
    n_harm = int(min(5000, 0.45 * sr) / f0.min())
    amps = []
    for k in range(1, n_harm + 1):
        fk = k * f0
        formant = sum(g / (1 + ((fk - vowel[:, j]) / (60 + 0.06 * vowel[:, j])) ** 2)
                      for j, g in enumerate((1.0, 0.7, 0.35)))
        gain = amp * k ** -d["voice_tilt"] * (0.15 + formant) * (fk < 0.45 * sr)
        amps.append(gain[:, None])
    voice = _harmonics(phase, amps).reshape(-1)[:n]
    breath = _fft_band(rng.standard_normal(n), sr, 0.2 * sr) * np.repeat(amp, block)[:n]
    return voice + 0.01 * breath


def _peak(x):
    return max(float(x.max()), -float(x.min()))


def _pan(x, pos):
    """Constant-power pan of a mono part, pos in [-1, 1]."""
    angle = (pos + 1) * np.pi / 4
    return np.stack([x * np.cos(angle), x * np.sin(angle)]) * np.sqrt(2)
