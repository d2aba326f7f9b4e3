"""The XP signature of a command line is the run's identity: the folder it resumes, the
name `dora run -f SIG` and the grids find. Refactors must keep it. These were computed on
main before the typed run config (commit 1f8b0fd) and must never change."""
import pytest

PINNED = {
    (): "97d170e1",
    ("continue_from=htdemucs", "htdemucs.lora_rank=8", "variant=finetune",
     "dset.wav=/data/stems"): "b6b7257a",
    ("model=htdemucs_tiny", "htdemucs.lora_rank=4",
     "htdemucs.lora_rank_mode=gradient"): "d76fe3be",
    ("variant=five_stem", "optim.lr=1e-3", "seed=3"): "4d50d1d7",
    ("lora_rank=8", "optim.lr=3e-4", "epochs=2"): "57e8efcb",  # an alias: signed canonical
}


@pytest.mark.parametrize("argv", list(PINNED), ids=lambda a: " ".join(a) or "defaults")
def test_signature_of_a_command_line_is_pinned(argv):
    from demucs_lora.train import main
    assert main.get_xp(list(argv)).sig == PINNED[argv]


def test_an_alias_signs_as_its_canonical_key():
    from demucs_lora.train import main
    assert main.get_xp(["htdemucs.lora_rank=8", "optim.lr=3e-4", "epochs=2"]).sig == \
        PINNED[("lora_rank=8", "optim.lr=3e-4", "epochs=2")]
