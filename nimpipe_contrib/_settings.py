"""Checking every stage's ``[stages.NAME]`` table without starting the stage.

:func:`check_stage_settings` reads a stage's table the way the stage does
when it is configured (no thread, no file, no connection): ``nimpipe config``
uses it to report bad stage settings (it lives in :mod:`nimpipe.settings` and
reads :data:`SETTINGS_READERS`).  The reader of one table is
:class:`nimpipe.settings.StageSettings`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from nimpipe.settings import StageSettings, check_stage_settings

if TYPE_CHECKING:
    from nimpipe.config import Config

__all__ = ["SETTINGS_READERS", "StageSettings", "check_stage_settings"]

# --------------------------------------------------------------------------
# Checking a stage's table without starting the stage
# --------------------------------------------------------------------------


def _read_catalog(config: Config) -> None:
    from nimpipe_contrib.nim.catalog_settings import CatalogSettings

    CatalogSettings.from_table(config.stage("nim_catalog"), config.source)


def _read_health(config: Config) -> None:
    from nimpipe_contrib.nim.health_settings import HealthSettings

    HealthSettings.from_table(config.stage("nim_health"), config.source)


def _read_ledger(config: Config) -> None:
    from nimpipe_contrib.cost.ledger import Ledger

    Ledger.from_settings(StageSettings.from_config(config, "ledger"))  # opens nothing yet


def _read_budget(config: Config) -> None:
    from nimpipe_contrib.cost.budget import create_plugin

    create_plugin().apply_settings(StageSettings.from_config(config, "budget"))


def _read_router(config: Config) -> None:
    from nimpipe_contrib.routing.router import create_plugin

    create_plugin().apply_settings(
        StageSettings.from_config(config, "router"), tuple(config.routes)
    )


def _read_cascade(config: Config) -> None:
    from nimpipe_contrib.routing.cascade import CascadeSettings

    CascadeSettings.from_settings(StageSettings.from_config(config, "cascade"))


def _read_guardrails(config: Config) -> None:
    from nimpipe_contrib.guardrails.settings import GuardrailsSettings

    GuardrailsSettings.from_config(config)


def _read_pii(config: Config) -> None:
    from nimpipe_contrib.guardrails.pii import PiiSettings

    PiiSettings.from_table(config.stage("pii_redactor"), config.source)


#: How each contrib stage reads its ``[stages.NAME]`` table, by stage name: the
#: reader the stage's ``configure`` uses, called on its own.  Every stage of
#: ``nimpipe.plugins.CONTRIB_STAGES`` has one (a test checks).
SETTINGS_READERS: Mapping[str, Callable[[Config], None]] = {
    "nim_catalog": _read_catalog,
    "nim_health": _read_health,
    "ledger": _read_ledger,
    "budget": _read_budget,
    "router": _read_router,
    "cascade": _read_cascade,
    "guardrails": _read_guardrails,
    "pii_redactor": _read_pii,
}
