"""``tools.export --format uvr``: the folder audio-separator (and UVR) load offline.

What those tools read (audio-separator 0.47.1, ``Separator.load_model`` and
``DemucsSeparator``): ``-m NAME.yaml`` is looked up in ``MODEL_DIR/download_checks.json``
under ``demucs_download_list["Demucs v4: ..."]``, whose values name the files to fetch
unless present; then demucs' own ``get_model(NAME, repo=MODEL_DIR)`` loads ``NAME.th``
(or the bag ``NAME.yaml`` + members). The outputs are *labelled by position*: 4 outputs
are Drums, Bass, Other, Vocals and 6 add Guitar, Piano (demucs' order); any other count is
read as the 4-stem layout, so a 5-stem model's stems come out under wrong names and the
5th is dropped, silently. UVR does the same and takes 6 stems only from a name holding
``6s``. So this export refuses every other layout in one line, and ``--reorder-stems``
permutes the heads (``models.source_remap.remap_model``: weights copied, nothing summed) when
the model's stems are exactly those of a layout in another order.
"""
from __future__ import annotations

import json
import typing as tp
from pathlib import Path

from demucs_lora.core.errors import ConfigError

if tp.TYPE_CHECKING:  # pragma: no cover
    from torch import nn

FOUR = ["drums", "bass", "other", "vocals"]
SIX = [*FOUR, "guitar", "piano"]
LIST_KEYS = ("vr_download_list", "mdx_download_list", "mdx_download_vip_list",
             "demucs_download_list", "mdx23c_download_list", "mdx23c_download_vip_list",
             "roformer_download_list")  # every list audio-separator reads from the file
CHECKS = "download_checks.json"
WORKING = ("4 stems [drums, bass, other, vocals] or 6 stems [drums, bass, other, vocals, "
           "guitar, piano], in that order")


def uvr_layout(sources: tp.Sequence[str], reorder: bool) -> tp.List[str]:
    """The demucs layout the tools will label ``sources`` by; ConfigError (one line, the
    stems, why, what works) when there is none, or when only --reorder-stems would fit."""
    sources = list(sources)
    for layout in (FOUR, SIX):
        if sources == layout:
            return layout
        if sorted(sources) == sorted(layout):
            if reorder:
                return layout
            raise ConfigError(
                f"--format uvr: stems {sources} are in another order than {layout}, and "
                "audio-separator/UVR name outputs by position (they would mislabel them): "
                "pass --reorder-stems to permute the heads into that order")
    raise ConfigError(
        f"--format uvr: a model with stems {sources} cannot be labelled right by "
        f"audio-separator/UVR: they name a Demucs model's outputs by position in demucs' "
        f"order and read any other count as 4 stems (outputs misnamed, extra ones dropped); "
        f"layouts that work: {WORKING}; use --format th, hf, onnx or msst for this model")


def check_uvr_name(name: str, sources: tp.Sequence[str], given: bool) -> str:
    """UVR reads 6 stems only from a name holding '6s' (and 4 from any other): the name
    for the layout, or a ConfigError when --name contradicts it."""
    six = len(sources) == 6
    if six == ("6s" in name):
        return name
    if not given and six:
        return f"{name}_6s"
    want = "contain '6s' (e.g. NAME_6s)" if six else "not contain '6s'"
    raise ConfigError(f"--name {name!r}: UVR takes 6 stems only from a model whose name "
                      f"holds '6s'; a {len(sources)}-stem model's name must {want}")


def reorder(model: "nn.Module", layout: tp.Sequence[str]) -> "nn.Module":
    """``model`` with its heads permuted into ``layout`` (the same model when it is)."""
    if list(model.sources) == list(layout):
        return model
    from demucs_lora.models.source_remap import remap_model
    return remap_model(model, list(layout)).eval()


def checks_entry(name: str, files: tp.Sequence[str]) -> dict:
    """The ``download_checks.json`` entry naming the files (no URL: present files are
    not fetched), with every list the tools read, the others empty."""
    lists: tp.Dict[str, dict] = {key: {} for key in LIST_KEYS}
    lists["demucs_download_list"] = {f"Demucs v4: {name}": {f: f for f in files}}
    return lists


def merged_checks(path: Path, entry: dict) -> str:
    """``path``'s JSON (a download_checks.json already there) with ``entry`` added, as
    text; ConfigError when the file is not one."""
    current: dict = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text())
            assert isinstance(current, dict)
        except (ValueError, AssertionError):
            raise ConfigError(f"{path} exists and is not a download_checks.json (JSON "
                              "object): move it away or export into another -o") from None
    for key, value in entry.items():
        current.setdefault(key, {}).update(value)
    return json.dumps(current, indent=4) + "\n"


MERGE_LINE = ("python -c \"import json,sys; a=json.load(open(sys.argv[1])); "
              "b=json.load(open(sys.argv[2])); [a.setdefault(k, {{}}).update(v) for k, v in "
              "b.items()]; json.dump(a, open(sys.argv[1], 'w'), indent=4)\" "
              "UVR_OR_MODEL_DIR/download_checks.json {entry}")


def uvr_lines(out: Path, name: str, entry_file: Path) -> tp.List[str]:
    return [f"  audio-separator: audio-separator SONG -m {name}.yaml --model_file_dir {out} "
            f"--output_dir separated (offline: {out / CHECKS} lists it)",
            "  UVR / another model folder: copy the files there and merge the entry: "
            + MERGE_LINE.format(entry=entry_file)]
