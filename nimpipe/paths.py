"""Where nimpipe keeps files: the user's config directory and the cache home.

Both follow the XDG base-directory rules the same way: an environment
variable that is set to an absolute path wins, a relative one is ignored (as
the spec says), and the default lives under the home directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["config_dir", "nimpipe_home"]


def _xdg(env: Mapping[str, str], name: str, default: str) -> Path:
    value = env.get(name)
    if value and os.path.isabs(value):
        return Path(value)
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / default


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """nimpipe's config directory: ``$XDG_CONFIG_HOME/nimpipe``, else ``~/.config/nimpipe``."""
    env = os.environ if environ is None else environ
    return _xdg(env, "XDG_CONFIG_HOME", ".config") / "nimpipe"


def nimpipe_home(environ: Mapping[str, str] | None = None) -> Path:
    """nimpipe's cache home (catalog cache, ledger, embedded model, test servers).

    ``$NIMPIPE_HOME`` when set and non-empty; otherwise ``$XDG_CACHE_HOME/nimpipe``
    when ``XDG_CACHE_HOME`` is an absolute path; otherwise ``~/.cache/nimpipe``.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("NIMPIPE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    return _xdg(env, "XDG_CACHE_HOME", ".cache") / "nimpipe"
