"""``tools.export --format uvr | msst | onnx | all``: the model where users run separation.

Each format is written by its module (``export_uvr``, ``export_msst``, ``export_onnx``)
from the XP's merged model; this one plans them: every model is loaded and every format
checked (stem layout, name, segment, onnx installed) and every target tested for
existence before the first file is written, then each XP's files are renamed into place
together. Each format prints the exact command that runs it in its tool; ``all`` writes
every format that applies into one folder with a README.txt listing them.
"""
from __future__ import annotations

import argparse
import shutil
import typing as tp
from pathlib import Path

from demucs_lora.core.errors import ConfigError
from demucs_lora.core.files import atomic_write_group

if tp.TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig
    from torch import nn

FORMATS = ("uvr", "msst", "onnx", "all")
Writes = tp.List[tp.Tuple[Path, tp.Callable[[str], None]]]


def th_writes(model: "nn.Module", cfg: "DictConfig", out: Path, name: str,
              half: bool = False) -> Writes:
    """NAME.th (a bag: NAME_mK.th members + NAME.yaml, the yaml last), demucs' format."""
    import torch
    from demucs.apply import BagOfModels
    from demucs.states import serialize_model
    from omegaconf import OmegaConf
    if isinstance(model, BagOfModels):
        from demucs_lora.models.bag import bag_writes
        return bag_writes(model, out, name, OmegaConf.to_container(cfg, resolve=True), half)
    package = serialize_model(model, cfg, half=half)
    return [(out / f"{name}.th", lambda tmp: torch.save(package, tmp))]


def demucs_lines(out: Path, name: str) -> tp.List[str]:
    return [f"  demucs: python -m demucs --repo {out} -n {name} SONG",
            f"  demucs-lora: python -m demucs_lora.commands.separate --repo {out} -n {name} "
            "SONG"]


def uvr_files(model: "nn.Module", cfg: "DictConfig", out: Path, name: str, given: bool,
              args: argparse.Namespace) -> tp.Tuple["nn.Module", str, Writes, tp.List[str]]:
    """(model in the tools' stem order, name, writes, lines) of the uvr folder."""
    import json
    import yaml
    from demucs.apply import BagOfModels
    from demucs_lora.commands import export_uvr as uvr
    layout = uvr.uvr_layout(model.sources, args.reorder_stems)
    before = list(model.sources)
    model = uvr.reorder(model, layout)
    name = uvr.check_uvr_name(name, layout, given)
    writes = th_writes(model, cfg, out, name, args.half)
    if not isinstance(model, BagOfModels):
        spec = yaml.safe_dump({"models": [name]})
        writes.append((out / f"{name}.yaml", lambda tmp: Path(tmp).write_text(spec)))
    files = [p.name for p, _ in writes]
    entry = uvr.checks_entry(name, files)
    entry_file = out / f"{name}.download_checks.json"
    uvr.merged_checks(out / uvr.CHECKS, entry)  # a file there that is not one: refused now
    entry_text = json.dumps(entry, indent=4) + "\n"
    writes += [(entry_file, lambda tmp: Path(tmp).write_text(entry_text)),
               (out / uvr.CHECKS, lambda tmp: Path(tmp).write_text(  # merged when written
                   uvr.merged_checks(out / uvr.CHECKS, entry)))]
    moved = f", heads reordered from {before}" if before != layout else ""
    lines = [f"wrote {', '.join(files)} + {entry_file.name} + {uvr.CHECKS} in {out} "
             f"(audio-separator/UVR, {len(layout)} stems {layout}{moved})",
             *uvr.uvr_lines(out, name, entry_file)]
    return model, name, writes, lines


def format_files(fmt: str, model: "nn.Module", cfg: "DictConfig", out: Path, name: str,
                 sig: str, args: argparse.Namespace) -> tp.Tuple[Writes, tp.List[str]]:
    """(writes, lines) of one XP in ``fmt`` (not ``all``)."""
    given = args.name is not None
    if fmt == "uvr":
        _, name, writes, lines = uvr_files(model, cfg, out, name, given, args)
        return writes, lines + demucs_lines(out, name)
    if fmt == "msst":
        from demucs_lora.commands.export_msst import msst_writes
        return msst_writes(model, out, name, sig)
    if fmt == "onnx":
        from demucs_lora.commands.export_onnx import onnx_writes
        return onnx_writes(model, out, name)
    raise ConfigError(f"--format {fmt}: unknown")  # pragma: no cover (argparse choices)


def all_files(model: "nn.Module", cfg: "DictConfig", out: Path, name: str, sig: str,
              args: argparse.Namespace) -> tp.Tuple[Writes, tp.List[str]]:
    """Every format that applies, into ``out``; a format that cannot take this model is
    skipped with its one-line reason (written into README.txt too)."""
    writes: Writes = []
    lines: tp.List[str] = []
    try:
        model, name, writes, lines = uvr_files(model, cfg, out, name, args.name is not None,
                                               args)
    except ConfigError as exc:
        writes = th_writes(model, cfg, out, name, args.half)
        lines = [f"wrote {', '.join(p.name for p, _ in writes)} in {out} (demucs)",
                 f"  skipped uvr: {exc}"]
    lines += demucs_lines(out, name)
    for fmt in ("msst", "onnx"):
        try:
            more, said = format_files(fmt, model, cfg, out, name, sig, args)
        except ConfigError as exc:
            lines.append(f"  skipped {fmt}: {exc}")
            continue
        writes, lines = writes + more, lines + said
    return writes, lines


def export_formats(jobs: tp.Sequence[tp.Any], args: argparse.Namespace, out: Path,
                   root: Path) -> tp.List[str]:
    """Load, check and plan every job, refuse existing targets, then write; the lines."""
    from demucs_lora.commands.export_xp import OutputExists, load_xp_model
    planned = []
    for job in jobs:
        model, cfg = load_xp_model(job.folder, args.adapter, args.trust_remote_code, root)
        build = all_files if args.format == "all" else (
            lambda *a: format_files(args.format, *a))
        writes, lines = build(model, cfg, out, job.name, job.sig, args)
        if job.lora_src is not None:
            from demucs_lora.lora.adapter_file import read_adapter
            read_adapter(job.lora_src)  # a torn, corrupt or NaN adapter is not exported
            for ext, dst in zip((".safetensors", ".json"), job.lora_dst):
                writes.insert(0, (dst, lambda tmp, s=job.lora_src.with_suffix(ext):
                                  shutil.copyfile(s, tmp)))
            lines.append(f"wrote {job.lora_dst[0]} + .json (the XP's adapter)")
        planned.append((job, writes, lines))
    if args.format == "all":
        planned.append(_readme(planned, out))
    existing = [str(p) for _, writes, _ in planned for p, _ in writes
                if p.exists() and p.name != "download_checks.json"]  # that one is merged
    if existing and not args.force:
        raise OutputExists(f"refusing to overwrite {', '.join(existing)}: pass --force, or "
                           "choose another --name / -o")
    printed = []
    for job, writes, lines in planned:
        atomic_write_group(writes)
        printed += ([f"exporting XP {job.sig} as {job.name} (--format {args.format})"]
                    if job is not None else []) + lines
    return printed


def _readme(planned: tp.Sequence[tp.Tuple[tp.Any, Writes, tp.List[str]]], out: Path
            ) -> tp.Tuple[None, Writes, tp.List[str]]:
    """README.txt of a --format all folder: every XP's files and the command for each tool."""
    text = ["What this folder holds (python -m tools.export --format all), and the command "
            "that runs each file in its tool:", ""]
    for job, _, lines in planned:
        text += [f"XP {job.sig} as {job.name}:", *lines, ""]
    body = "\n".join(text)
    path = out / "README.txt"
    return None, [(path, lambda tmp: Path(tmp).write_text(body))], [
        f"wrote {path} (what each file is, how to run it)"]
