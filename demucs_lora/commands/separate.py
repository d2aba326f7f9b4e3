"""Separate audio files like ``python -m demucs``, with LoRA adapters (``demucs-lora``).

    python -m demucs_lora.commands.separate -n NAME [--repo DIR] SONG_OR_FOLDER ... \\
        [--adapter SIG1 --adapter SIG2 [--merge]] [--two-stems vocals] [--flac | --mp3] \\
        [--int24 | --float32] [--clip-mode rescale] [--filename '{track}/{stem}.{ext}'] \\
        [--segment S] [-j N] [--shifts 1] [--overlap 0.25] [-o separated]

Why not the stock ``demucs`` CLI: it loads one plain model per run. Here the base is
loaded once and each adapter is put on it in turn, unmerged (the LoRA path runs next to
the frozen weights) or merged on the fly (``--merge``); adapters of the same layout only
swap tensors. Every demucs flag is spelled and behaves as in ``demucs.separate``: the
mixture is normalized by its mono mean/std, ``demucs.apply.apply_model`` separates it
(``--shifts``, ``--overlap``, ``--segment``, ``-j``), stems are written by demucs' own
encoders (``inference.stem_files``: 16-bit wav by default) into
``OUT/NAME[_ADAPTER]/TRACK/STEM.EXT``. Added: folders as input (their audio files), and
``-n FILE.onnx`` (``tools.export --format onnx``) run by onnxruntime through the same
chunked overlap-add. Exit status: 0 done; 2 a usage error; 1 a data, model or adapter
error (one line naming the file and the fix).
"""
from __future__ import annotations

import argparse
import typing as tp
from pathlib import Path

from demucs_lora.commands.arguments import fraction, non_negative_int, positive_int
from demucs_lora.core.errors import AudioError, ConfigError, exit_on_user_error
from demucs_lora.core.files import not_a_folder

if tp.TYPE_CHECKING:  # pragma: no cover
    from torch import nn
    from demucs_lora.inference.stem_files import StemFormat

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".aiff", ".aif", ".opus")


def adapter_names(paths: tp.Sequence[Path], given: tp.Sequence[str]) -> tp.List[str]:
    """One folder-friendly, unique name per adapter: the XP signature when given as one,
    else the file stem (``NAME.lora`` from tools.export gives ``NAME``), prefixed by the
    parent folder when stems collide
    (``outputs/xps/A/lora_best`` and ``outputs/xps/B/lora_best`` -> ``A_lora_best``...)."""
    names = [text if "/" not in text and not Path(text).suffix and path.parent.name == text
             else path.name.removesuffix(".lora") for text, path in zip(given, paths)]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}_{n}" if names.count(n) > 1 else n
                 for n, p in zip(names, paths)]
    seen: tp.Dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--name", "--base", dest="name", default="htdemucs",
                        help="model: NAME in --repo or demucs' caches, an XP signature, a "
                        ".th/.safetensors/.yaml path, or FILE.onnx (default htdemucs, as "
                        "demucs; --base: the same, the old spelling)")
    parser.add_argument("--repo", type=Path, help="folder of model files (release_models)")
    parser.add_argument("--adapter", "--lora_checkpoint", "--lora-checkpoint", dest="adapter",
                        action="append", default=[],
                        help="adapter path (x, x.safetensors or x.json) or XP signature "
                             "(its lora_best); repeat for several; none = the model alone")
    parser.add_argument("--merge", action="store_true",
                        help="merge each adapter into the weights (faster inference)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow full unpickling of model files (they are code!)")


def _compute_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--device", default=None,
                        help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--shifts", type=non_negative_int, default=1,
                        help="random time shifts averaged (default 1, as demucs; 0 = exact)")
    parser.add_argument("--overlap", type=fraction, default=0.25,
                        help="overlap between chunks, in [0, 1)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--no-split", dest="split", action="store_false",
                       help="process whole tracks at once (memory hungry)")
    split.add_argument("--segment", type=positive_int,
                       help="chunk length in seconds (at most the model's segment)")
    parser.add_argument("-j", "--jobs", type=non_negative_int, default=0,
                        help="chunks separated in parallel threads (CPU)")


def _output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--out", type=Path, default=Path("separated"),
                        help="output folder; a subfolder per model (default: separated)")
    parser.add_argument("--filename", default="{track}/{stem}.{ext}",
                        help="output file name template: {track}, {trackext}, {stem}, {ext}")
    parser.add_argument("--two-stems", dest="stem", metavar="STEM",
                        help="only STEM and no_STEM")
    parser.add_argument("--other-method", choices=["none", "add", "minus"], default="add",
                        help="no_STEM as the sum of the other stems (add), the mix minus "
                        "STEM (minus: written as minus_STEM) or not written (none)")
    depth = parser.add_mutually_exclusive_group()
    depth.add_argument("--int24", action="store_true", help="24-bit wav")
    depth.add_argument("--float32", action="store_true",
                       help="float32 wav (the default is 16-bit, as demucs)")
    parser.add_argument("--clip-mode", default="rescale", choices=["rescale", "clamp", "none"],
                        help="avoid clipping by rescaling the stem (default) or clamping")
    encoding = parser.add_mutually_exclusive_group()
    encoding.add_argument("--flac", action="store_true", help="flac (needs ffmpeg)")
    encoding.add_argument("--mp3", action="store_true", help="mp3")
    parser.add_argument("--mp3-bitrate", type=positive_int, default=320)
    parser.add_argument("--mp3-preset", choices=range(2, 8), type=int, default=2,
                        help="2: best quality (default), 7: fastest")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="demucs-lora", description="Separate audio files as demucs does, with a model "
        "and LoRA adapters (one output folder per adapter).")
    parser.add_argument("tracks", nargs="+", type=Path, help="audio files or folders of them")
    _model_flags(parser)
    _compute_flags(parser)
    _output_flags(parser)
    return parser


def stem_format(args: argparse.Namespace) -> "StemFormat":
    from demucs_lora.inference.stem_files import StemFormat
    ext = "mp3" if args.mp3 else "flac" if args.flac else "wav"
    return StemFormat(ext=ext, clip=args.clip_mode, bits_per_sample=24 if args.int24 else 16,
                      as_float=args.float32, bitrate=args.mp3_bitrate, preset=args.mp3_preset)


def expand_tracks(paths: tp.Sequence[Path]) -> tp.List[Path]:
    """Files as given, folders as their audio files (sorted); AudioError for a missing
    path or a folder without audio, before any model is loaded."""
    tracks, missing = [], []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise AudioError(f"folder {path} holds no audio file "
                                 f"({', '.join(AUDIO_SUFFIXES)})")
            tracks += found
        elif path.is_file():
            tracks.append(path)
        else:
            missing.append(str(path))
    if missing:
        raise AudioError(f"input file(s) not found: {', '.join(missing)}")
    return list(dict.fromkeys(tracks))


def output_name(name: str) -> str:
    """The model's folder under -o, as demucs names it (``hf://NS/X`` -> ``NS_X``); a file
    path gives its stem."""
    if name.endswith((".th", ".safetensors", ".onnx", ".yaml", ".onnx.json")):
        return Path(name).name.split(".")[0]
    return name.replace("hf://", "").replace("/", "_")


def load_model(args: argparse.Namespace) -> "nn.Module":
    """The model -n names: an ONNX file (onnxruntime), else ``demucs_lora.get_model``."""
    if args.name.endswith((".onnx", ".onnx.json")):
        from demucs_lora.inference.onnx_model import load_onnx_model
        if args.adapter:
            raise ConfigError(f"-n {args.name}: an ONNX model has its adapter merged in; "
                              "drop --adapter (or export the XP again)")
        return load_onnx_model(Path(args.name))
    from demucs_lora.api import get_model
    return get_model(args.name, repo=args.repo, trust_remote_code=args.trust_remote_code)


def check_model_flags(model: "nn.Module", args: argparse.Namespace) -> None:
    """demucs' checks on --segment and --two-stems, as ConfigErrors before any compute."""
    from demucs.apply import BagOfModels
    limit = (model.max_allowed_segment if isinstance(model, BagOfModels)
             else float(model.segment))
    if args.segment is not None and args.segment > limit:
        raise ConfigError(f"--segment {args.segment}: longer than the model was trained "
                          f"for (a Transformer model); the maximum is {limit}")
    if args.stem is not None and args.stem not in model.sources:
        raise ConfigError(f"--two-stems {args.stem}: not a stem of {args.name}; STEM must "
                          f"be one of {', '.join(model.sources)}")


def run(args: argparse.Namespace) -> tp.List[Path]:
    """Separate every track with every adapter; returns the files written."""
    from demucs_lora.inference.separation import inference_device
    from demucs_lora.inference.stem_files import check_template
    device = inference_device(args.device)
    check_template(args.filename)
    tracks = expand_tracks(args.tracks)
    if not_a_folder(args.out):
        raise ConfigError(f"-o {args.out}: {not_a_folder(args.out)}; give an output folder")
    base = load_model(args)
    check_model_flags(base, args)
    written: tp.List[Path] = []
    for folder, model, adapter in _models(base, args):
        model.to(device)
        line = f" (adapter {adapter}{', merged' if args.merge else ''})" if adapter else ""
        print(f"Separated tracks will be stored in {folder.resolve()}{line}")
        label = f"model {args.name}" + (f" with adapter {adapter}" if adapter else "")
        written += _separate_tracks(model, tracks, folder, args, device, label)
        model.cpu()
    return written


def _models(base: "nn.Module", args: argparse.Namespace
            ) -> tp.Iterator[tp.Tuple[Path, "nn.Module", tp.Optional[str]]]:
    """(output folder, model, adapter path or None) per run: the model alone, or one per
    adapter."""
    from demucs_lora.model_files.resolve import resolve_adapter
    name = output_name(args.name)
    if not args.adapter:
        yield args.out / name, base, None
        return
    from demucs_lora.api import with_adapter
    adapters = [resolve_adapter(a) for a in args.adapter]
    current = None
    for label, path in zip(adapter_names(adapters, args.adapter), adapters):
        current = with_adapter(base, path, current, merge=args.merge)
        yield args.out / f"{name}_{label}", current, str(path)


def _separate_tracks(model: "nn.Module", tracks: tp.Sequence[Path], folder: Path,
                     args: argparse.Namespace, device: str, label: str) -> tp.List[Path]:
    """Every track: separate, refuse non-finite stems (naming `label`, the model and
    adapter), then write them; nothing is written for a track whose stems hold NaN/inf."""
    import tqdm
    from demucs_lora.core.finite import check_finite_output
    from demucs_lora.inference.separation import read_audio, separate_tensor
    from demucs_lora.inference.stem_files import stem_outputs, write_stem_files
    fmt, written = stem_format(args), []
    for track in tqdm.tqdm(tracks, desc=folder.name, unit="track", disable=len(tracks) < 2):
        wav = read_audio(track, model.samplerate, model.audio_channels)
        stems = separate_tensor(model, wav, shifts=args.shifts, overlap=args.overlap,
                                split=args.split, segment=args.segment, device=device,
                                progress=True, jobs=args.jobs)
        check_finite_output(stems, model.sources, f"{label} on {track}")
        outputs = stem_outputs(stems, model.sources, wav, args.stem, args.other_method)
        written += write_stem_files(outputs, folder, track, model.samplerate, fmt,
                                    args.filename)
    return written


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """Console script ``demucs-lora``; a user error exits with one line (exit_code)."""
    args = get_parser().parse_args(argv)
    with exit_on_user_error():
        written = run(args)
    print(f"wrote {len(written)} files")


if __name__ == "__main__":
    main()
