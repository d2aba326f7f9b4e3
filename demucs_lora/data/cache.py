"""JSON caches of per-track results (metadata, checks), one file per dataset root and kind,
written atomically; an entry is reused while its files' (size, mtime) stamps are unchanged."""
import hashlib
import json
import os
from pathlib import Path

from demucs_lora.core.files import atomic_write_text

CACHE_VERSION = 2


def file_stamp(path):
    """(size, mtime_ns) of a file, or None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def cache_path(cache_dir, root, kind):
    """cache_dir/KIND_<hash of the resolved root>.json (one file per dataset and kind)."""
    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"{kind}_{digest}.json"


def load_cache(path):
    """The tracks of a cache file ({} when absent, unreadable or of another version)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data.get("tracks", {}) if data.get("version") == CACHE_VERSION else {}


def save_cache(path, root, tracks):
    """Atomic write (temporary file, then rename)."""
    atomic_write_text(path, json.dumps({"version": CACHE_VERSION,
                                        "root": str(Path(root).resolve()), "tracks": tracks}))
