"""Where the checkout's folders are: the Hydra configs and the shipped assets.

One owner, so that moving a module never breaks a ``parents[N]`` count."""
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = PACKAGE_DIR.parent
CONF_DIR = REPO_DIR / "conf"
ASSETS_DIR = PACKAGE_DIR / "assets"
