"""Separate audio files with a base model and one or more adapters (``demucs-lora``).

    python -m demucs_lora.commands.separate song.wav --base NAME --repo release_models \\
        --adapter outputs/xps/SIG1/lora_best --adapter SIG2 [--merge] [-o separated]

Why not the stock ``demucs`` CLI: it loads one plain model per run. Here the base is
loaded once and each adapter is put on it in turn, unmerged (the LoRA path runs next to
the frozen weights) or merged on the fly (``--merge``: plain-model speed); adapters of the
same layout only swap tensors. Everything else follows the stock CLI so results compare:
the mixture is normalized by its (mono) mean/std before ``apply_model`` and restored
after, ``--shifts 1 --overlap 0.25`` by default, and stems land in
``OUT/MODEL[_ADAPTER]/TRACK/SOURCE.wav`` (float32 wav, no clipping) or ``.mp3``
(``demucs.audio.save_audio``, which rescales to avoid clipping like the stock CLI).
Audio in and out: ``demucs_lora.inference.separation``. Exit status: 0 done; 2 a config
or usage error; 1 a data, model or adapter error (one line naming the file and the fix).
"""
from __future__ import annotations

import argparse
import typing as tp
from pathlib import Path

from demucs_lora.commands.arguments import fraction, non_negative_int
from demucs_lora.core.errors import AudioError, ConfigError, exit_on_user_error
from demucs_lora.core.files import not_a_folder
from demucs_lora.inference.separation import (inference_device, read_audio, separate_tensor,
                                              write_stems)


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


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="demucs-lora", description="Separate audio files with a base HTDemucs and "
        "LoRA adapters (one output folder per adapter).")
    parser.add_argument("tracks", nargs="+", type=Path, help="audio files")
    parser.add_argument("--base", required=True,
                        help="base model: NAME in --repo, an XP signature or a .th path")
    parser.add_argument("--repo", type=Path, help="folder of model files (release_models)")
    parser.add_argument("--adapter", "--lora_checkpoint", "--lora-checkpoint", dest="adapter",
                        action="append", default=[],
                        help="adapter path (x, x.safetensors or x.json) or XP signature "
                             "(its lora_best); repeat for several; none = the base alone "
                             "(--lora_checkpoint: the same, as other projects spell it)")
    parser.add_argument("--merge", action="store_true",
                        help="merge each adapter into the weights (faster inference)")
    parser.add_argument("-o", "--out", type=Path, default=Path("separated"),
                        help="output folder (default: separated)")
    parser.add_argument("--mp3", action="store_true", help="write mp3 instead of float32 wav")
    parser.add_argument("--mp3-bitrate", type=int, default=320)
    parser.add_argument("--shifts", type=non_negative_int, default=1,
                        help="random time shifts averaged (default 1, as demucs; 0 = exact)")
    parser.add_argument("--overlap", type=fraction, default=0.25,
                        help="overlap between chunks, in [0, 1)")
    parser.add_argument("--no-split", dest="split", action="store_false",
                        help="process whole tracks at once (memory hungry)")
    parser.add_argument("-d", "--device", default=None,
                        help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow full unpickling of model files (they are code!)")
    return parser


def run(args: argparse.Namespace) -> tp.List[Path]:
    """Separate every track with every adapter; returns the files written."""
    import tqdm
    from demucs_lora.api import get_model, model_display_name, with_adapter
    from demucs_lora.core.finite import check_finite_output
    from demucs_lora.hub.resolve import resolve_adapter
    device = inference_device(args.device)
    missing = [str(t) for t in args.tracks if not t.is_file()]
    if missing:
        raise AudioError(f"input file(s) not found: {', '.join(missing)}")
    if not_a_folder(args.out):
        raise ConfigError(f"-o {args.out}: {not_a_folder(args.out)}; give an output folder")
    base = get_model(args.base, repo=args.repo, trust_remote_code=args.trust_remote_code)
    adapters = [resolve_adapter(a) for a in args.adapter]
    runs: tp.List[tp.Tuple[str, tp.Optional[Path]]] = [("", None)] if not adapters else [
        (f"_{name}", path) for name, path in
        zip(adapter_names(adapters, args.adapter), adapters)]
    base_name = model_display_name(args.base)
    written: tp.List[Path] = []
    current = None
    for suffix, adapter in runs:
        if adapter is None:
            model = base
        else:
            model = current = with_adapter(base, adapter, current, merge=args.merge)
        model.to(device)
        out = args.out / f"{base_name}{suffix}"
        print(f"Separated tracks will be stored in {out.resolve()}"
              + (f" (adapter {adapter}{', merged' if args.merge else ''})" if adapter else ""))
        for track in tqdm.tqdm(args.tracks, desc=out.name, unit="track",
                               disable=len(args.tracks) < 2):
            wav = read_audio(track, model.samplerate, model.audio_channels)
            stems = separate_tensor(model, wav, shifts=args.shifts, overlap=args.overlap,
                                    split=args.split, device=device, progress=True)
            check_finite_output(stems, model.sources, f"model {args.base}" + (
                f" with adapter {adapter}" if adapter else "") + f" on {track}")
            written += write_stems(stems, model.sources, out / track.name.rsplit(".", 1)[0],
                                   model.samplerate, mp3=args.mp3, bitrate=args.mp3_bitrate)
        model.cpu()
    return written


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """Console script ``demucs-lora``; a user error exits with one line (exit_code)."""
    args = get_parser().parse_args(argv)
    with exit_on_user_error():
        written = run(args)
    print(f"wrote {len(written)} files")


if __name__ == "__main__":
    main()
