"""Stems to files exactly as ``python -m demucs`` writes them (the one place stems are
written).

Why demucs' own functions: the encoders are ``demucs.audio.save_audio`` (clip strategy,
16/24-bit PCM or float32 wav, flac through ffmpeg, mp3 through lameenc), so a stem written
here is byte-for-byte the file ``python -m demucs`` writes for the same samples and flags.
The only difference is where: each file goes to a temp beside its target and is renamed
into place (``core.files``), so a kill never leaves a torn stem. File names follow
demucs' ``--filename`` template (``{track}``, ``{trackext}``, ``{stem}``, ``{ext}``) and
``--two-stems`` (``STEM`` + ``no_STEM``, or ``minus_STEM`` with ``--other-method minus``).
"""
from __future__ import annotations

import os
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from demucs_lora.core.errors import ConfigError
from demucs_lora.core.files import atomic_write_group

if tp.TYPE_CHECKING:  # pragma: no cover
    import torch

TEMPLATE_KEYS = ("track", "trackext", "stem", "ext")


@dataclass(frozen=True)
class StemFormat:
    """How stems are encoded: demucs' ``save_audio`` arguments, named as its CLI flags."""
    ext: str = "wav"             # wav, flac (--flac) or mp3 (--mp3)
    clip: str = "rescale"        # --clip-mode: rescale, clamp, tanh or none
    bits_per_sample: int = 16    # --int24: 24
    as_float: bool = False       # --float32
    bitrate: int = 320           # --mp3-bitrate
    preset: int = 2              # --mp3-preset

    def describe(self) -> str:
        if self.ext == "mp3":
            return f"mp3 {self.bitrate} kbps"
        depth = "float32" if self.as_float and self.ext == "wav" else f"{self.bits_per_sample}-bit"
        return f"{depth} {self.ext}, clip mode {self.clip}"


def check_template(template: str) -> str:
    """``--filename`` checked before any compute: unknown ``{keys}`` or a bad brace is a
    ConfigError naming the template and the keys demucs knows."""
    try:
        name = template.format(track="t", trackext="wav", stem="s", ext="wav")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"--filename {template!r}: {type(exc).__name__} {exc}; use only "
                          f"{', '.join('{' + k + '}' for k in TEMPLATE_KEYS)} "
                          "(default {track}/{stem}.{ext})") from None
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ConfigError(f"--filename {template!r} leaves the output folder: give a "
                          "relative template such as {track}/{stem}.{ext}")
    return template


def stem_outputs(stems: "torch.Tensor", sources: tp.Sequence[str], mix: "torch.Tensor",
                 two_stems: tp.Optional[str] = None, other_method: str = "add"
                 ) -> tp.List[tp.Tuple[str, "torch.Tensor"]]:
    """(stem name, audio) in demucs' order: every source, or with ``two_stems`` the
    ``minus_STEM`` (mix - STEM, ``other_method`` minus), STEM, and ``no_STEM`` (the sum of
    the other sources, ``other_method`` add), as ``demucs.separate.main`` does."""
    import torch
    by_name = dict(zip(sources, stems))
    if two_stems is None:
        return list(by_name.items())
    out = []
    if other_method == "minus":
        out.append((f"minus_{two_stems}", mix - by_name[two_stems]))
    out.append((two_stems, by_name.pop(two_stems)))
    if other_method == "add":
        rest = torch.zeros_like(next(iter(by_name.values())))
        for stem in by_name.values():
            rest += stem
        out.append((f"no_{two_stems}", rest))
    return out


def _save_writer(wav: "torch.Tensor", samplerate: int, fmt: StemFormat
                 ) -> tp.Callable[[str], None]:
    """A writer for ``atomic_write``: demucs' ``save_audio`` picks the encoder from the
    suffix, so it writes ``tmp.EXT`` which is then moved onto the temp itself."""
    from demucs.audio import save_audio

    def write(tmp: str) -> None:
        named = f"{tmp}.{fmt.ext}"
        try:
            save_audio(wav, named, samplerate, bitrate=fmt.bitrate, clip=fmt.clip,
                       bits_per_sample=fmt.bits_per_sample, as_float=fmt.as_float,
                       preset=fmt.preset)
            os.replace(named, tmp)
        finally:
            if os.path.exists(named):
                os.unlink(named)
    return write


def write_stem_files(outputs: tp.Sequence[tp.Tuple[str, "torch.Tensor"]], folder: Path,
                     track: Path, samplerate: int, fmt: StemFormat,
                     template: str = "{track}/{stem}.{ext}") -> tp.List[Path]:
    """Every stem of one track under ``folder`` by ``template``, renamed into place
    together; returns the paths."""
    name, _, ext = track.name.rpartition(".")
    name, ext = (name, ext) if name else (track.name, track.name)
    writes = []
    for stem, wav in outputs:
        path = folder / template.format(track=name, trackext=ext, stem=stem, ext=fmt.ext)
        writes.append((path, _save_writer(wav.detach().cpu().float(), samplerate, fmt)))
    return atomic_write_group(writes)
