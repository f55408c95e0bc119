"""What a stage author needs, in one place.

Stages, built-in, contrib or third-party, import from here (and from
:mod:`nimpipe.types`, :mod:`nimpipe.errors`) and from nowhere else in
nimpipe: the hook markers, the reader of a stage's settings table, the
directories nimpipe keeps files in, route flags the pipeline reads, and the
helpers that keep keys out of text::

    from nimpipe.stage import StageSettings, hookimpl

    @hookimpl
    def configure(pipeline):
        settings = StageSettings.of(pipeline, "shout")
        ...

Importing it is cheap: no stage, no SDK, no network.
"""

from __future__ import annotations

from nimpipe._markers import hookimpl, hookspec
from nimpipe.hosts import host_of, is_loopback, is_private_address
from nimpipe.paths import config_dir, nimpipe_home
from nimpipe.redaction import API_KEY, register_secret, scrub, scrub_data, scrub_fields
from nimpipe.settings import StageSettings

__all__ = [
    "API_KEY",
    "NO_STREAM",
    "StageSettings",
    "config_dir",
    "hookimpl",
    "hookspec",
    "host_of",
    "is_loopback",
    "is_private_address",
    "nimpipe_home",
    "register_secret",
    "scrub",
    "scrub_data",
    "scrub_fields",
]

#: Route flag: call this route without streaming (the caller may still stream).
NO_STREAM = "no-stream"
