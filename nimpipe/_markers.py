"""The pluggy markers for the ``nimpipe`` project, defined once."""

from __future__ import annotations

import pluggy

#: The project name pluggy uses; it is also the entry-point group of plugin packages.
PROJECT_NAME = "nimpipe"

#: Marks hook specifications (in :mod:`nimpipe.hookspecs` or a plugin's ``addhooks``).
hookspec = pluggy.HookspecMarker(PROJECT_NAME)

#: Marks hook implementations in plugins.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
