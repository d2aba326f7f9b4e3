"""`core.plain`: one converter of config values (OmegaConf nodes, a model's recorded
tuples and fractions) to plain Python, used by LoraConfig, the run config and the checks."""
import fractions

from omegaconf import OmegaConf

from demucs_lora.core.plain import plain


def test_nodes_tuples_and_fractions_become_plain_python():
    cfg = OmegaConf.create({"ranks": {"encoder.*": 4}, "qkv": [True, False, True],
                            "name": "x", "none": None})
    assert plain(cfg) == {"ranks": {"encoder.*": 4}, "qkv": [True, False, True],
                          "name": "x", "none": None}
    assert type(plain(cfg)["ranks"]) is dict and type(plain(cfg)["qkv"]) is list
    assert plain(cfg.qkv, tuple) == (True, False, True)
    assert plain((1, (2, fractions.Fraction(39, 5)))) == [1, [2, 7.8]]
    assert plain(fractions.Fraction(1, 2)) == 0.5 and plain("abc") == "abc"
    assert plain(None) is None and plain(3) == 3
    node = OmegaConf.create({"a": 2, "b": "${a}", "wav": "???"})
    assert plain(node) == {"a": 2, "b": 2, "wav": "???"}   # resolved; ??? read, not raised
