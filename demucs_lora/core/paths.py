"""Where the checkout's folders are: the Hydra configs and the shipped assets.

One owner, so that moving a module never breaks a ``parents[N]`` count."""
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = PACKAGE_DIR.parent
CONF_DIR = REPO_DIR / "conf"
ASSETS_DIR = PACKAGE_DIR / "assets"


def user_path(value) -> Path:
    """A path the user wrote, absolute: against the directory a Hydra run started in
    (Hydra may change the cwd), else against the cwd."""
    try:
        from hydra.utils import to_absolute_path
        return Path(to_absolute_path(str(Path(str(value)).expanduser())))
    except Exception:  # no Hydra run
        return Path(str(value)).expanduser().resolve()
