"""The NIM stages: ``nim_catalog`` (models, context windows) and ``nim_health`` (probes, routing).

One job per module; importing the package imports none of them.

Shared:

- :mod:`~nimpipe_contrib.nim.endpoints`: the endpoints behind routes, the ``/v1/models`` reply;
- :mod:`~nimpipe_contrib.nim.hookspecs`: the hooks the stages declare (``nim_catalog``,
  ``nim_status``);
- :mod:`~nimpipe_contrib.nim.reports`: the ``nimpipe models`` / ``nimpipe status`` tables;
- :mod:`~nimpipe_contrib.nim.commands`: the ``nimpipe models`` / ``nimpipe status`` commands.

Catalog:

- :mod:`~nimpipe_contrib.nim.catalog`: the ``nim_catalog`` stage (its hooks);
- :mod:`~nimpipe_contrib.nim.catalog_settings`: its ``[stages.nim_catalog]`` settings;
- :mod:`~nimpipe_contrib.nim.model_catalog`: what every endpoint serves, context windows;
- :mod:`~nimpipe_contrib.nim.known_models`: the shipped snapshot and the user's override file;
- :mod:`~nimpipe_contrib.nim.catalog_cache`: one endpoint's answer, and the disk cache.

Health:

- :mod:`~nimpipe_contrib.nim.health`: the ``nim_health`` stage (its hooks);
- :mod:`~nimpipe_contrib.nim.health_settings`: its ``[stages.nim_health]`` settings;
- :mod:`~nimpipe_contrib.nim.registry`: endpoint states and the circuit breaker;
- :mod:`~nimpipe_contrib.nim.probes`: what one probe's replies mean (pure);
- :mod:`~nimpipe_contrib.nim.prober`: sending probes (threads, one ``httpx`` client);
- :mod:`~nimpipe_contrib.nim.monitor`: the registry plus the probes that fill it, waits;
- :mod:`~nimpipe_contrib.nim.routing`: choosing routes by health and load;
- :mod:`~nimpipe_contrib.nim.metrics`: NIM's (and vLLM's) figures from Prometheus metrics;
- :mod:`~nimpipe_contrib.nim.exposition`: the Prometheus text format parser.
"""
