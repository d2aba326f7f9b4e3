"""Where the head of a requested source comes from when the base model lacks it.

Order, for each requested source NAME that is not one of the base's sources:
1. `source_init[NAME]` (a base source, or a list of them whose heads are summed);
2. a spelling of a base source ("vocal", "Vocals", "hi_hat" vs "hi-hat"): that head;
3. the default taxonomy below (the first family target the base has);
4. nothing fits: the head starts from zero (and the log says how to set source_init).
Each choice is one line (`SourceChoice.line`), logged into train.log by the caller.

The taxonomy (documented in docs/models.md):
- drum parts (kick, snare, hihat, toms, cymbals, ...) -> drums
- instruments (guitar, piano, keys, synth, strings, ...) -> guitar / piano when the base
  has them (htdemucs_6s), else other
- vocal variants (vocal, voice, lead, backing, choir, ...) -> vocals
- bass variants (sub, 808, synth_bass, ...) -> bass
- accompaniment / instrumental / no_vocals / karaoke -> the sum of the non-vocal stems
"""
from __future__ import annotations

import dataclasses
import re
import typing as tp

DRUM_PARTS = ("kick", "kicks", "bassdrum", "bass_drum", "kick_drum", "snare", "snares",
              "hihat", "hihats", "hi_hat", "hat", "hats", "tom", "toms", "cymbal", "cymbals",
              "crash", "ride", "overheads", "percussion", "perc", "clap", "claps", "rim",
              "shaker", "tambourine", "drum_parts")
GUITARS = ("guitar", "guitars", "electric_guitar", "acoustic_guitar", "gtr")
KEYS = ("piano", "keys", "keyboard", "keyboards", "organ", "rhodes", "epiano")
INSTRUMENTS = GUITARS + KEYS + (
    "synth", "synths", "strings", "string", "pad", "pads", "brass", "horns", "winds",
    "woodwinds", "lead_synth", "pluck", "plucks", "arp", "fx", "sfx", "instruments", "melody")
VOCALS = ("vocal", "voice", "voices", "vox", "lead", "lead_vocal", "lead_vocals", "backing",
          "backing_vocal", "backing_vocals", "bvs", "choir", "harmonies", "singing", "speech")
BASS = ("sub", "sub_bass", "subbass", "808", "synth_bass", "bass_guitar", "bassline")
ACCOMPANIMENT = ("accompaniment", "instrumental", "inst", "no_vocals", "novocals",
                 "karaoke", "backing_track", "music", "minus_one")
VOCAL_BASES = ("vocals", "vocal", "voice")
DEFAULT_SOURCES = ("drums", "bass", "other", "vocals")   # a new model without dset.sources


def _family_targets(name: str) -> tp.Optional[tp.List[str]]:
    key = normalize(name)
    norm = lambda names: {normalize(n) for n in names}  # noqa: E731
    if key in norm(DRUM_PARTS):
        return ["drums"]
    if key in norm(GUITARS):
        return ["guitar", "other"]
    if key in norm(KEYS):
        return ["piano", "other"]
    if key in norm(INSTRUMENTS):
        return ["other"]
    if key in norm(VOCALS):
        return ["vocals"]
    if key in norm(BASS):
        return ["bass"]
    return None


def is_accompaniment(name: str) -> bool:
    return normalize(name) in {normalize(n) for n in ACCOMPANIMENT}


def normalize(name: str) -> str:
    """Case, separators and a plural `s` do not make another stem: 'Hi-Hats' ~ 'hihat'."""
    key = re.sub(r"[\s_\-.]+", "", str(name).lower())
    return key[:-1] if len(key) > 3 and key.endswith("s") else key


def spelling_of(name: str, candidates: tp.Sequence[str]) -> tp.Optional[str]:
    """The one candidate that only a spelling separates from `name` (or None)."""
    same = [c for c in candidates if c != name and normalize(c) == normalize(name)]
    return same[0] if len(same) == 1 else None


@dataclasses.dataclass
class SourceChoice:
    source: str
    init: tp.List[str]          # base sources whose heads are summed ([] = zero head)
    why: str                    # kept | source_init | spelling | taxonomy | sum | zero

    @property
    def line(self) -> str:
        heads = " + ".join(self.init)
        if self.why == "kept":
            return f"source {self.source}: the base's own head"
        if self.why == "source_init":
            return f"source {self.source}: head from {heads} (source_init)"
        if self.why == "spelling":
            return (f"source {self.source}: not a source of the base, but a spelling of its "
                    f"'{heads}': head from {heads}")
        if self.why == "taxonomy":
            return f"source {self.source}: new stem, head from {heads} (default taxonomy)"
        if self.why == "sum":
            return (f"source {self.source}: new stem, head = the sum of {heads} (default "
                    "taxonomy: accompaniment = the non-vocal stems)")
        return (f"source {self.source}: new stem that the taxonomy does not know: its head "
                f"starts from zero (set source_init={{{self.source}: <one of the base's "
                "sources>}} to start from a head)")


def plan_sources(base_sources: tp.Sequence[str], sources: tp.Sequence[str],
                 source_init: tp.Optional[tp.Mapping] = None) -> tp.List[SourceChoice]:
    """One SourceChoice per requested source (see the module docstring for the order)."""
    base = list(base_sources)
    source_init = dict(source_init or {})
    plan = []
    for name in sources:
        if name in source_init:
            init = source_init[name]
            plan.append(SourceChoice(name, [init] if isinstance(init, str) else list(init),
                                     "source_init"))
        elif name in base:
            plan.append(SourceChoice(name, [name], "kept"))
        elif spelling_of(name, base):
            plan.append(SourceChoice(name, [spelling_of(name, base)], "spelling"))
        elif is_accompaniment(name):
            rest = [s for s in base if normalize(s) not in {normalize(v) for v in VOCAL_BASES}]
            plan.append(SourceChoice(name, rest, "sum") if rest and len(rest) < len(base)
                        else SourceChoice(name, [], "zero"))
        else:
            targets = [t for t in (_family_targets(name) or []) if t in base]
            plan.append(SourceChoice(name, targets[:1], "taxonomy") if targets
                        else SourceChoice(name, [], "zero"))
    return plan


def init_mapping(plan: tp.Sequence[SourceChoice]) -> tp.Dict[str, tp.Any]:
    """The source_init that reproduces a plan (new sources only; a single head as str)."""
    out: tp.Dict[str, tp.Any] = {}
    for choice in plan:
        if choice.why in ("kept", "zero"):
            continue
        out[choice.source] = choice.init[0] if len(choice.init) == 1 else list(choice.init)
    return out
