"""Values the user wrote take effect or are refused against the base: weight-free HTDemucs
arguments (t_dropout...) may differ from the base's and are applied to it; `weights` are
checked against the sources the run resolves (the base's when dset.sources is unset)."""
import pytest
import torch.nn as nn
from helpers import FOUR, tiny_htdemucs

from demucs_lora.config.compose import compose
from demucs_lora.core.errors import ConfigError
from demucs_lora.config import resolve as rc

OTHER_VALUE = {"use_train_segment": False, "t_dropout": 0.3}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("key", rc.RUNTIME_KWARGS)
def test_weight_free_kwargs_shape_no_weight(key):
    assert _shapes(tiny_htdemucs(FOUR)) == _shapes(tiny_htdemucs(FOUR, **{key: OTHER_VALUE[key]}))


def test_t_dropout_differs_from_the_base_and_is_applied():
    base = tiny_htdemucs(FOUR, t_dropout=0.02)
    cfg = compose(["continue_from=htdemucs", "htdemucs.t_dropout=0.0"])
    record, lines = rc.check_architecture(cfg, base, explicit={"t_dropout"})
    assert record["htdemucs.t_dropout"] == 0.0
    assert lines == ["htdemucs.t_dropout=0.0 applied to the base (it had 0.02; no weight "
                     "depends on it)"]
    rc.apply_runtime_kwargs(base, cfg)
    drops = [m.p for m in base.crosstransformer.modules() if isinstance(m, nn.Dropout)]
    attn = [m.dropout for m in base.crosstransformer.modules()
            if isinstance(m, nn.MultiheadAttention)]
    assert drops and attn and set(drops) == set(attn) == {0.0}
    assert base._init_args_kwargs[1]["t_dropout"] == 0.0      # saved with the model


@pytest.mark.parametrize("weights,message", [
    ("[1,2]", "weights=[1, 2]: give one weight per source (4: ['drums', 'bass', 'other', "
              "'vocals']) or null"),
    ("[1,1,nan,1]", "give a list of finite numbers >= 0"),
    ("[a,b,c,d]", "give a list of finite numbers >= 0"),
    ("[0,0,0,0]", "not all 0"),
])
def test_weights_checked_against_the_base_sources(weights, message):
    """dset.sources unset (the default): the length is checked once the base's sources
    are known, before any data is read (it used to crash at the first step)."""
    base = tiny_htdemucs(FOUR, t_heads=4)
    with pytest.raises(ConfigError) as info:
        cfg = compose(["continue_from=htdemucs", f"weights={weights}"])
        rc.resolve_with_base(cfg, base)
    assert message in str(info.value)
    out, _ = rc.resolve_with_base(compose(["continue_from=htdemucs", "weights=[1,2,1,1]"]),
                                  base)
    assert list(out.weights) == [1, 2, 1, 1]
