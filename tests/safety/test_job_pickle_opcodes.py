"""Dora's job.pkl is scanned against an allowlist of opcodes, imports and calls
(demucs_lora.training.dora_files): one test per opcode that can import or call. Each
payload is first shown to be live (plain pickle.loads runs it), then refused unread."""
import pathlib
import pickle

import pytest

from demucs_lora.training.dora_files import check_job_pickle, pickle_problems


def _refused(tmp_path, data, *words):
    (tmp_path / "job.pkl").write_bytes(data)
    with pytest.raises(SystemExit) as info:
        check_job_pickle(tmp_path)
    message = str(info.value)
    assert "refusing to let Dora unpickle" in message and "\n" not in message
    for word in words:
        assert word in message, (word, message)
    return message


def _touch(marker):
    return f"touch {marker}".encode()


def _live(data, marker):
    """The payload runs under plain pickle.loads (so the refusal below matters)."""
    try:
        pickle.loads(data)
    except Exception:
        pass
    assert marker.exists()
    marker.unlink()


def test_global_reduce(tmp_path):
    marker = tmp_path / "pwned"
    data = b"cos\nsystem\n(S'" + _touch(marker) + b"'\ntR."
    _live(data, marker)
    _refused(tmp_path, data, "os.system (GLOBAL)")


def test_stack_global(tmp_path):
    marker = tmp_path / "pwned"
    data = (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c" + bytes([len(_touch(marker))])
            + _touch(marker) + b"\x94\x85\x94R\x94.")
    _live(data, marker)
    _refused(tmp_path, data, "os.system (STACK_GLOBAL)")
    # names fetched from the memo are traced; a computed name is refused as such
    assert pickle_problems(b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93.") == \
        ["it imports os.system (STACK_GLOBAL)"]
    assert "<a name it computes>" in pickle_problems(b"\x80\x04K\x01K\x02\x93.")[0]


def test_inst(tmp_path):
    marker = tmp_path / "pwned"
    data = b"(S'" + _touch(marker) + b"'\nios\nsystem\n."   # the 50-byte payload of the issue
    _live(data, marker)
    _refused(tmp_path, data, "os.system (INST)")


def test_obj(tmp_path):
    marker = tmp_path / "pwned"
    data = b"(cos\nsystem\nS'" + _touch(marker) + b"'\no."
    _live(data, marker)
    _refused(tmp_path, data, "os.system (GLOBAL)")


def test_newobj_and_reduce_of_something_not_imported(tmp_path):
    assert "os.system (GLOBAL)" in pickle_problems(b"\x80\x02cos\nsystem\n)\x81.")[0]
    # an object made from the allowlist, then called: refused, not traced as allowed
    made = b"\x80\x02ccollections\nOrderedDict\n)R)R."
    assert pickle_problems(made) == ["its REDUCE calls something not imported from the "
                                     "allowlist"]
    _refused(tmp_path, made, "REDUCE")


def test_build_on_a_class_is_refused(tmp_path):
    """BUILD on an imported class (not an object made from it) sets class attributes."""
    data = b"\x80\x02cpathlib\nPosixPath\nN}X\x05\x00\x00\x00pwnedK\x01s\x86b."
    try:
        pickle.loads(data)
        assert pathlib.PosixPath.pwned == 1   # live: the allowlisted class is patched
    finally:
        if "pwned" in vars(pathlib.PosixPath):
            delattr(pathlib.PosixPath, "pwned")
    _refused(tmp_path, data, "BUILD")


@pytest.mark.parametrize("opcode,data", [
    ("EXT1", b"\x80\x02\x82\x01)R."),
    ("PERSID", b"P1\n."),
    ("BINPERSID", b"\x80\x02K\x01Q."),
])
def test_opcodes_outside_the_allowlist(tmp_path, opcode, data):
    _refused(tmp_path, data, f"the {opcode} opcode")


def test_real_submitit_jobs_pass(tmp_path):
    import submitit
    for job in (submitit.SlurmJob(pathlib.Path(tmp_path), "12"),
                submitit.LocalJob(pathlib.Path(tmp_path), "13")):
        for protocol in (2, 4, 5):  # Dora writes the default (4 or 5)
            assert pickle_problems(pickle.dumps((job, [], []), protocol=protocol)) == []
