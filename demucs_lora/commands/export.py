"""Export trained XPs as plain demucs models (``demucs-lora-export``).

    python -m tools.export SIG [SIG ...] [-o release_models] [--name NAME] [--force]
        [--adapter best|last] [--include-lora] [--half | --quantize 8]
        [--format th|hf|uvr|msst|onnx|all] [--reorder-stems]

Why: an XP holds a LoRA adapter and a merged ``best.th``; users of the stock CLI need one
file in demucs' own ``serialize_model`` format, found by name in a folder::

    python -m demucs --repo release_models -n NAME song.wav

So ``OUT/NAME.th`` is a plain HTDemucs with the adapter merged in (``--adapter best``:
the XP's ``best.th``; ``last``: its base + ``lora_last``, merged). NAME defaults to the
signature and may not contain '-' (demucs reads ``NAME-CHECKSUM.th``).

- ``--half``: float16 weights (``serialize_model(half=True)``), half the size; the stock
  CLI loads it (demucs itself ships half models).
- ``--quantize 8``: weight-only int8 (``model_files.int8.quantize``), about a quarter of the
  size. Load it with ``demucs_lora.get_model(NAME, repo=OUT)`` or ``demucs-lora -n NAME --repo OUT``;
  the stock demucs CLI cannot read it (it fails loudly). The export prints the size ratio
  and the nSDR change on a few valid tracks of the XP's config (float vs int8).
- ``--format hf``: demucs 4.1's Hugging Face layout instead, ``OUT/NAME.yaml`` (a bag of
  one model) + ``OUT/SIG.safetensors`` (class and arguments as JSON metadata, as
  ``demucs.hf`` reads them). Upload the folder to a hub repo ``NS/Demucs-NAME`` (or
  ``NS/HTDemucs-X`` for a NAME ``htdemucs_X``) and every demucs 4.1 user runs it with
  ``demucs -n hf://NS/NAME``; ``pretrained_repo=OUT`` / ``get_model(NAME, repo=OUT)`` read it too.
- ``--format uvr | msst | onnx | all``: audio-separator/UVR, MSST, onnxruntime, or all of
  them in one folder with a README.txt (``commands.export_formats``; docs/publishing.md).
- ``--include-lora``: also ``NAME.lora.safetensors`` + ``NAME.lora.json``, the XP's
  adapter, for use on the base with ``load_lora_weights``; prints its size vs the model.

Nothing is overwritten without ``--force``, and every output of every XP is checked
before the first file is written; each file is written atomically (temp + rename).
"""
from __future__ import annotations

import argparse
import io
import re
import shutil
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from demucs_lora.commands.arguments import positive_int
from demucs_lora.core.files import atomic_write_group, not_a_folder
from demucs_lora.commands.export_uvr import FOUR, SIX
from demucs_lora.commands.export_xp import OutputExists, load_xp_model  # noqa: F401 (API)
from demucs_lora.core.errors import ConfigError, ModelLoadError, exit_on_user_error

if tp.TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig
    from torch import nn

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*$")
EVAL_TRACKS = 2


@dataclass
class Job:
    """One XP to export and the files it will write."""
    sig: str
    folder: Path
    name: str
    model_path: Path
    lora_src: tp.Optional[Path] = None
    lora_dst: tp.List[Path] = field(default_factory=list)
    bag_path: tp.Optional[Path] = None  # --format hf: NAME.yaml naming SIG.safetensors
    members: tp.List[Path] = field(default_factory=list)  # a bag XP: NAME_mK files

    @property
    def outputs(self) -> tp.List[Path]:
        return [self.model_path, *self.lora_dst, *([self.bag_path] if self.bag_path else []),
                *self.members]


def check_name(name: str) -> str:
    """A model name demucs' LocalRepo reads back as itself."""
    if "-" in name:
        raise ConfigError(f"--name {name!r} contains '-': demucs reads NAME-CHECKSUM.th and "
                          f"would look for {name.split('-')[0]!r}; use '_' instead "
                          f"(e.g. {name.replace('-', '_')!r})")
    if not NAME_RE.match(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '_' and '.' only (it "
                          "becomes the file name NAME.th)")
    return name


def find_xp(sig: str, root: Path) -> Path:
    """outputs/xps/SIG, or ModelLoadError listing the 5 most recent XPs."""
    from demucs_lora.model_files.resolve import recent_xps, xp_folder, xps_dir as xps_root
    folder = xp_folder(sig, root)
    if folder is None:
        recent = recent_xps(root)
        listing = (f"most recent XPs: {', '.join(recent)}" if recent
                   else f"{xps_root(root)} holds no XP (run from the folder with outputs/)")
        raise ModelLoadError(f"unknown XP signature {sig!r}: no folder {xps_root(root) / sig}"
                             f"; {listing}")
    if not (folder / "config.yaml").is_file():
        raise ModelLoadError(f"XP {folder} has no config.yaml (was it started by "
                             "demucs_lora.train?)")
    return folder


def plan(sigs: tp.Sequence[str], out: Path, name: tp.Optional[str], which: str,
         include_lora: bool, force: bool, root: Path, fmt: str = "th") -> tp.List[Job]:
    """Resolve every XP and output path; refuse existing files (unless force) up front."""
    if name is not None and len(sigs) != 1:
        raise ConfigError(f"--name {name!r} needs exactly one signature (got {len(sigs)}): "
                          "several XPs are exported under their signatures")
    jobs = []
    for sig in dict.fromkeys(sigs):  # a signature given twice is exported once
        folder = find_xp(sig, root)
        job = Job(sig, folder, check_name(name or sig), out / f"{name or sig}.th")
        if (folder / "best.yaml").is_file():  # an adapted bag: NAME.yaml + NAME_mK files
            from demucs_lora.models.bag import member_names
            from demucs_lora.model_files.caches import read_bag
            count = len(read_bag(folder / "best.yaml")["models"])
            suffix = ".safetensors" if fmt == "hf" else ".th"
            job.model_path = out / f"{job.name}.yaml"
            job.members = [out / f"{m}{suffix}" for m in member_names(job.name, count)]
        elif fmt == "hf":
            job.model_path = out / f"{sig}.safetensors"
            job.bag_path = out / f"{job.name}.yaml"
        adapter = folder / f"lora_{which}"
        if include_lora or which == "last":
            if not (adapter.with_suffix(".safetensors").is_file()
                    and adapter.with_suffix(".json").is_file()):
                raise ModelLoadError(
                    f"XP {folder} has no adapter lora_{which}.safetensors/.json (a full "
                    "fine-tune, or no epoch done yet): export without --include-lora"
                    + (" and with --adapter best" if which == "last" else ""))
        if include_lora:
            job.lora_src = adapter
            job.lora_dst = [out / f"{job.name}.lora.safetensors", out / f"{job.name}.lora.json"]
        jobs.append(job)
    existing, clashes = [], []
    for job in jobs:
        existing += [str(p) for p in job.outputs if p.exists()]
        if out.is_dir():  # demucs refuses a repo where two files give the same name
            clashes += [str(p) for p in out.glob(f"{job.name}-*.th")]
    if clashes:
        raise OutputExists(f"{', '.join(clashes)} already hold model(s) of the same name for "
                           "demucs (NAME-CHECKSUM.th): remove them or choose another --name")
    if existing and not force:
        raise OutputExists(f"refusing to overwrite {', '.join(existing)}: pass --force, or "
                           "choose another --name / -o")
    return jobs


def _package_bytes(package: dict) -> int:
    import torch
    buf = io.BytesIO()
    torch.save(package, buf)
    return buf.tell()


def _nsdr_cost(model: "nn.Module", quantized_path: Path, cfg: "DictConfig",
               tracks: int) -> str:
    """nSDR of float vs int8 on the first ``tracks`` valid tracks (shifts 0): one line."""
    from demucs_lora.core.errors import DatasetError
    from demucs_lora.config.run_config import data_config
    from demucs_lora.inference.evaluation import build_dataset, evaluate_model
    from demucs_lora.models.load import load_model
    try:
        data = build_dataset(data_config(cfg, model.sources), "valid", model.samplerate,
                             model.audio_channels, progress=False)
    except (DatasetError, ConfigError, OSError) as exc:
        return f"nSDR change not measured (valid set unavailable: {exc})"
    settings = dict(shifts=0, overlap=float(cfg.test.overlap), split=bool(cfg.test.split),
                    metrics=("nsdr",), max_tracks=tracks, progress=False)
    ref = evaluate_model(model, data, **settings)["summary"]["nsdr"]
    quant = load_model(quantized_path)
    got = evaluate_model(quant, data, **settings)["summary"]["nsdr"]
    count = min(tracks, len(data.metadata))
    return (f"nSDR on {count} valid track(s): float {ref:.3f} dB, int8 {got:.3f} dB, "
            f"change {got - ref:+.3f} dB")


def export_one(job: Job, args: argparse.Namespace, root: Path) -> tp.List[str]:
    """Write the files of one job as a whole (all of them or none: temporary files renamed
    together, the adapter header last); returns the lines to print."""
    from demucs.states import serialize_model
    model, cfg = load_xp_model(job.folder, args.adapter, args.trust_remote_code, root)
    float_size = sum(_package_bytes(serialize_model(m, cfg, half=False))
                     for m in getattr(model, "models", [model]))  # every member of a bag
    writes, last = _model_writes(job, args, model, cfg)
    if job.lora_src is not None:
        from demucs_lora.lora.adapter_file import read_adapter
        read_adapter(job.lora_src)  # a torn, corrupt or NaN adapter is not exported
        for ext, dst in zip((".safetensors", ".json"), job.lora_dst):
            writes.append((dst, lambda tmp, src=job.lora_src.with_suffix(ext):
                           shutil.copyfile(src, tmp)))
    paths = atomic_write_group(writes + last)
    size = job.model_path.stat().st_size
    if job.members:
        size = sum(p.stat().st_size for p in paths if p in job.members)
    lines = [_model_line(job, args, size, float_size)]
    if list(model.sources) not in (FOUR, SIX):  # a word for whoever loads it elsewhere
        lines.append(f"  note: stems {list(model.sources)}: demucs and demucs-lora label "
                     "them right; audio-separator/UVR would not (they label by position in "
                     "demucs' 4/6-stem order): do not load this file there")
    if args.quantize and not job.members and not args.no_eval:
        lines.append("  " + _nsdr_cost(model, job.model_path, cfg, args.eval_tracks))
    if job.lora_src is not None:
        lsize = job.lora_dst[0].stat().st_size
        lines.append(f"wrote {job.lora_dst[0]} + .json (adapter lora_{args.adapter}: "
                     f"{lsize:,} bytes = {100 * lsize / size:.2f}% of {job.model_path.name}, "
                     f"{100 * lsize / float_size:.2f}% of the float32 model)")
    return lines


Writes = tp.List[tp.Tuple[Path, tp.Callable[[str], None]]]


def _model_writes(job: Job, args: argparse.Namespace, model: "nn.Module",
                  cfg: "DictConfig") -> tp.Tuple[Writes, Writes]:
    """(the model files to write, those to rename after every other one: a bag's
    NAME.yaml, which names its members) in the format the arguments ask for."""
    import torch
    from demucs.states import serialize_model
    from omegaconf import OmegaConf
    fmt = getattr(args, "format", "th")
    training_args = OmegaConf.to_container(cfg, resolve=True)
    if job.members:
        from demucs_lora.models.bag import bag_writes
        if args.quantize:
            raise ConfigError(f"XP {job.sig} is a bag: --quantize writes single models only")
        writes = bag_writes(model, job.model_path.parent, job.name, training_args,
                            half=args.half, fmt=fmt)
        return writes[:-1], writes[-1:]
    if args.quantize:
        from demucs_lora.model_files.int8 import quantize
        package = quantize(model, bits=args.quantize, training_args=training_args)
    elif fmt == "hf":
        from demucs_lora.model_files.packages import safetensors_writer
        spec = f"models: ['{job.sig}']\n"
        return [(job.model_path, safetensors_writer(model, half=args.half)),
                (job.bag_path, lambda tmp: Path(tmp).write_text(spec))], []
    else:
        package = serialize_model(model, cfg, half=args.half)
    return [(job.model_path, lambda tmp: torch.save(package, tmp))], []


def _model_line(job: Job, args: argparse.Namespace, size: int, float_size: int) -> str:
    """What was written and how to load it, for the model file(s) of ``job``."""
    if job.members:
        return (f"wrote bag {job.model_path} + {len(job.members)} member files ({size:,} "
                f"bytes); stock CLI: python -m demucs --repo {job.model_path.parent} -n "
                f"{job.name} TRACK")
    if args.quantize:
        return (f"wrote {job.model_path} ({size:,} bytes, int{args.quantize}: "
                f"{size / float_size:.2f}x the float32 model's {float_size:,}; load "
                "with demucs_lora.get_model, the stock demucs CLI cannot read it)")
    if getattr(args, "format", "th") == "hf":
        return (f"wrote {job.bag_path} + {job.model_path} ({size:,} bytes, demucs 4.1 "
                f"HF layout); upload the folder's two files to a hub repo and run demucs "
                f"-n hf://NAMESPACE/{job.name}")
    kind = f"float16, {size / float_size:.2f}x float32" if args.half else "float32"
    return (f"wrote {job.model_path} ({size:,} bytes, {kind}); stock CLI: python -m "
            f"demucs --repo {job.model_path.parent} -n {job.name} TRACK")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="demucs-lora-export", description="Export XPs as demucs model files "
        "(adapters merged) that `python -m demucs --repo OUT -n NAME` loads.")
    parser.add_argument("sigs", nargs="+", metavar="SIG", help="XP signatures (outputs/xps/SIG)")
    parser.add_argument("-o", "--out", type=Path, default=Path("release_models"),
                        help="output folder (default: release_models)")
    parser.add_argument("--name", help="model name (one SIG only; default: the signature)")
    parser.add_argument("--adapter", choices=["best", "last"], default="best",
                        help="best: the XP's best.th; last: base + lora_last merged")
    parser.add_argument("--include-lora", action="store_true",
                        help="also write NAME.lora.safetensors + NAME.lora.json")
    enc = parser.add_mutually_exclusive_group()
    enc.add_argument("--half", action="store_true", help="store float16 weights")
    enc.add_argument("--quantize", type=int, choices=[8], default=None,
                     help="store int8 weights (demucs_lora.get_model only)")
    parser.add_argument("--format", choices=["th", "hf", "uvr", "msst", "onnx", "all"],
                        default="th",
                        help="th: NAME.th for `demucs --repo OUT -n NAME` (default); hf: "
                        "NAME.yaml + SIG.safetensors, demucs 4.1's Hugging Face layout; "
                        "uvr: audio-separator/UVR folder; msst: MSST config + checkpoint; "
                        "onnx: NAME.onnx for onnxruntime; all: every one of them + README.txt")
    parser.add_argument("--reorder-stems", action="store_true",
                        help="--format uvr/all: permute the heads into demucs' stem order "
                        "when the model's stems are those in another order")
    parser.add_argument("--no-eval", action="store_true",
                        help="with --quantize: skip the nSDR comparison")
    parser.add_argument("--eval-tracks", type=positive_int, default=EVAL_TRACKS,
                        help=f"valid tracks for the nSDR comparison (default {EVAL_TRACKS})")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow full unpickling of model files (they are code!)")
    return parser


def run(args: argparse.Namespace, root: tp.Optional[Path] = None) -> tp.List[Job]:
    """Plan every export (all checks first), then write; returns the jobs done."""
    root = Path(root or Path.cwd())
    out = args.out if args.out.is_absolute() else root / args.out
    if not_a_folder(out):
        raise ConfigError(f"-o {args.out}: {not_a_folder(out)}; give an output folder")
    fmt = getattr(args, "format", "th")
    if fmt != "th" and args.quantize:
        raise ConfigError(f"--format {fmt} stores float weights (only demucs_lora reads "
                          "int8): drop --quantize, or use --format th")
    if fmt not in ("th", "hf"):
        from demucs_lora.commands.export_formats import export_formats
        jobs = plan(args.sigs, out, args.name, args.adapter, args.include_lora, True, root)
        for line in export_formats(jobs, args, out, root):
            print(line)
        return jobs
    jobs = plan(args.sigs, out, args.name, args.adapter, args.include_lora, args.force, root,
                fmt)
    for job in jobs:  # temps of an earlier export of these very files that was killed
        for target in job.outputs:
            for tmp in target.parent.glob(f".{target.name}.*.tmp"):
                tmp.unlink(missing_ok=True)
    for job in jobs:
        print(f"exporting XP {job.sig} as {job.name}")
        for line in export_one(job, args, root):
            print(line)
    return jobs


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """Console script ``demucs-lora-export``; a user error exits with one line (exit_code)."""
    args = get_parser().parse_args(argv)
    with exit_on_user_error():
        run(args)


if __name__ == "__main__":
    main()
