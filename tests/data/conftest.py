"""The data room's fixtures: synthetic stem folders and the verify_dataset CLI."""
import shutil

import pytest

SR = 8000  # the data tests' sample rate (small files, fast checks)


@pytest.fixture(scope="session")
def synth_folder(tmp_path_factory):
    """synth_folder(dest, **generate_dataset kwargs): a fresh copy at `dest` of a synthetic
    stem folder generated once per session and set of kwargs (tests may damage their copy)."""
    from helpers import synth_stems
    made = {}

    def fresh_copy(dest, **kwargs):
        key = repr(sorted(kwargs.items()))
        if key not in made:
            made[key] = synth_stems(tmp_path_factory.mktemp("synth") / "ds", **kwargs)
        return shutil.copytree(made[key], dest)
    return fresh_copy


@pytest.fixture
def cli(tmp_path, capsys):
    """cli(*args) -> (exit status, printed text) of `python -m tools.verify_dataset ARGS`
    at SR, with a private metadata cache and no progress bar."""
    from demucs_lora.commands.verify_dataset import main

    def run(*args):
        with pytest.raises(SystemExit) as exit_:
            main([*map(str, args), f"dset.samplerate={SR}", f"dset.metadata={tmp_path / 'm'}",
                  "--no-progress"])
        out = capsys.readouterr()
        return exit_.value.code, out.out + out.err
    return run
