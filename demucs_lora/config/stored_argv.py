"""What an XP folder may hand back to a run: the overrides in its ``.argv.json``.

`dora run -f SIG` (and `dora info -f`, `dora launch -f`, grids re-reading an XP) start
from the argv Dora stored in ``outputs/xps/SIG/.argv.json``: a file anyone who can write
to outputs/ can edit. Only the user's own command line and conf/ are trusted, so a stored
argv may only hold plain ``key=value`` overrides of known keys and the *name* of an
option of one of conf/'s groups (``variant=finetune``); never a path to a YAML file
(``variant=../../outputs/xps/SIG/evil`` would load a config from the XP folder itself),
Hydra's own settings, an interpolation, or ``trust_remote_code``. And since a config file
could set ``trust_remote_code`` too, a run where it is true but no command-line override
set it is refused (`check_trust_from_command_line`).
"""
from __future__ import annotations

import re
import typing as tp

from omegaconf import DictConfig

from demucs_lora.config.aliases import canonical_key, split_override
from demucs_lora.config.keys import GROUPS
from demucs_lora.config.schema import is_known
from demucs_lora.core.errors import ConfigError
from demucs_lora.core.paths import CONF_DIR

_OPTION_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")
_COMMAND_LINE_ONLY = ("trust_remote_code",)


def stored_override_problem(arg: str) -> tp.Optional[str]:
    """Why `arg` from a stored argv may not be replayed (None: a plain known override)."""
    prefix, key, value = split_override(arg)
    if value is None or prefix == "~":
        return "not a key=value override"
    if key in GROUPS:
        if prefix or not _OPTION_NAME.match(value) or \
                not (CONF_DIR / key / f"{value}.yaml").is_file():
            return f"not the name of an option in conf/{key}/"
        return None
    if key == "hydra" or key.startswith(("hydra.", "hydra/")) or "/" in key or "@" in key:
        return "Hydra's own settings"
    if canonical_key(key) in _COMMAND_LINE_ONLY:
        return "only your own command line may set it"
    if not is_known(key) or "_target_" in key:
        return "not a known key"
    if "${" in value:
        return "an interpolation (resolvers read the environment)"
    return None


def trusted_argv_from_xp(argv: tp.Sequence[str], source: str) -> tp.List[str]:
    """The stored argv as is, or a ConfigError naming every override it may not hold."""
    bad = [(a, stored_override_problem(a)) for a in argv]
    bad = [f"{a!r} ({why})" for a, why in bad if why]
    if bad:
        raise ConfigError(
            f"{source} holds {', '.join(bad)}: an XP folder may only hold key=value "
            "overrides of known keys and names of conf/ group options. Start from your own "
            "command line instead (`dora run KEY=VALUE ...`), or delete the file if you did "
            "not edit it")
    return list(argv)


def check_trust_from_command_line(cfg: DictConfig, argv: tp.Sequence[str]) -> None:
    """ConfigError when trust_remote_code is true but no command-line override set it: a
    config file (a variant, a pasted block, an XP folder) may not switch on unpickling."""
    if not cfg.get("trust_remote_code"):
        return
    for arg in argv:
        _, key, value = split_override(arg)
        if value is not None and canonical_key(key) == "trust_remote_code":
            return
    raise ConfigError("trust_remote_code=true comes from a config file, not from your "
                      "command line: a file may not switch on full unpickling of model "
                      "files. Remove it from the file and pass trust_remote_code=true on the "
                      "command line if you trust the model file")
