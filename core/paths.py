"""Where edgebuild keeps its caches."""
from __future__ import annotations

import os
from pathlib import Path


def edgebuild_home() -> Path:
    """``$EDGEBUILD_HOME``, else the user cache dir (e.g. ``~/.cache/edgebuild``)."""
    env = os.environ.get("EDGEBUILD_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir
    return Path(user_cache_dir("edgebuild", appauthor=False))
