"""Check backends of the ``guardrails`` stage: one interface, one verdict type.

Every backend answers three questions about a turn, each with a
:class:`~nimpipe.types.Verdict` (or ``None`` when it has nothing to check
there), and raises :class:`~nimpipe.errors.BackendUnavailable` when it cannot
answer: the service is down, too slow, or answered something that is not a
verdict.

- :mod:`.base`: the :class:`~.base.Backend` interface and what every backend
  shares (rail names, the verdict of a NeMo rails check, quoting a reply);
- :mod:`.loop`: :class:`~.loop.LoopThread`, the event loop the backends run on;
- :mod:`.http`: the JSON-over-HTTP client of the remote backends;
- :mod:`.microservice`: :class:`~.microservice.MicroserviceBackend`, a NeMo
  Guardrails server (rails-only ``POST /v1/checks``, and guarded generation);
- :mod:`.inprocess`: :class:`~.inprocess.InProcessBackend`, NeMo Guardrails'
  ``LLMRails`` in this process (``LLMRails.check_async``);
- :mod:`.nemoguard`: the NemoGuard safety services (content safety, topic
  control, jailbreak detection).

Backends are coroutines driven by one event loop, the stage's
:class:`~.loop.LoopThread`; none of them is imported, connected or loaded at
import time.  ``nemoguardrails`` is imported only by the in-process backend.

Every text that comes from a service (an error message, a rail name, a
category, a rewrite, a reply quoted in ``BackendUnavailable``) is scrubbed of
secrets (:func:`nimpipe.stage.scrub`) before it reaches a verdict or a reason:
a service may echo the key it was sent.  Backend keys are registered as
secrets (:func:`nimpipe.stage.register_secret`).
"""
