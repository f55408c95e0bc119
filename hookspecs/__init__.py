"""nimpipe hook specifications, in the order a turn meets them.

Installed as :mod:`nimpipe.hookspecs`.  Implement any of these in a plugin with
``@nimpipe.hookimpl``; an implementation may accept fewer arguments than the
spec names, and may be a coroutine function (the pipeline awaits what it
returns; under the synchronous :meth:`Pipeline.run` the coroutine runs on a
private event loop of the calling thread).

Calling conventions, stated once and used in every docstring below:

- *Chained*: implementations run one after another in pluggy's order
  (``tryfirst`` first, ``trylast`` last, otherwise latest registered first);
  each receives the value as the previous one left it.  A ``Block`` stops the
  chain.
- *First result wins*: implementations run in pluggy's order until one
  returns something other than ``None``.  Stops at first non-None result.
- *Collected*: every implementation runs; the pipeline combines the results
  as the hook's docstring says.

nimpipe dispatches the pipeline hooks itself (so that it can await coroutines
and name the plugin that failed), so ``hookwrapper``/``wrapper`` implementations
are refused on them; use ``tryfirst``/``trylast`` to order stages.  Hooks added
by plugins through :func:`addhooks` are ordinary pluggy hooks.

Hookspecs only grow: arguments are added, never removed or renamed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nimpipe._markers import hookspec

if TYPE_CHECKING:
    import pluggy

    from nimpipe.cli import CommandRegistry
    from nimpipe.errors import ProviderError
    from nimpipe.pipeline import Pipeline
    from nimpipe.types import (
        Attempt,
        Block,
        CallRecord,
        Decision,
        Deferred,
        Output,
        Response,
        Rewrite,
        Route,
        Turn,
    )

#: Hooks the pipeline calls as a chain (each sees the previous one's result).
CHAINED = frozenset({"pre_input", "filter_routes", "before_call", "post_output"})

# --------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------


@hookspec(historic=True)
def addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Register new hook specifications.

    Called once for every plugin as it is registered (a historic hook: plugins
    registered later are called too).  A plugin that declares its own hooks
    calls ``pluginmanager.add_hookspecs(module_or_class)`` here; other plugins
    then implement them and the declaring plugin calls them through
    ``pipeline.hooks.call(name, ...)`` or ``await pipeline.hooks.acall(...)``.

    :param pluginmanager: the :class:`pluggy.PluginManager` of the pipeline.
    :return: nothing.  *Collected* (results are ignored).
    """


@hookspec
def configure(pipeline: Pipeline) -> None:
    """Read settings and acquire resources.

    Called once when a :class:`~nimpipe.pipeline.Pipeline` is built, after
    every plugin is registered and before the first turn.  A stage reads its
    own table with ``pipeline.config.stage(name)``.  It must not block on the
    network: start background work here, never wait for it.

    :param pipeline: the pipeline being configured.
    :return: nothing.  *Collected* (results are ignored).
    """


@hookspec
def unconfigure(pipeline: Pipeline) -> None:
    """Release resources: called once by :meth:`Pipeline.close`.

    :param pipeline: the pipeline being closed.
    :return: nothing.  *Collected* (results are ignored).
    """


# --------------------------------------------------------------------------
# Phase 1: input
# --------------------------------------------------------------------------


@hookspec
def pre_input(turn: Turn, pipeline: Pipeline) -> Turn | Rewrite | Block | Deferred | None:
    """Inspect, rewrite or block a turn's input before any model call.

    Called once per turn, before a route is chosen.

    :param turn: the turn as the previous implementation left it.
    :param pipeline: the running pipeline.
    :return: ``None`` to leave the input alone; a new :class:`Turn` (or a
        :class:`Rewrite` whose ``value`` is one) to rewrite it; a
        :class:`Block` to stop the turn (no model is called); or a
        :class:`Deferred` check that runs alongside the model call and cancels
        it if it returns a block.  *Chained*.
    """


# --------------------------------------------------------------------------
# Phase 2: provider
# --------------------------------------------------------------------------


@hookspec
def filter_routes(
    turn: Turn, routes: tuple[Route, ...], pipeline: Pipeline
) -> tuple[Route, ...] | None:
    """Narrow and order the routes a turn may use.

    Called before every :func:`select_provider` call (once per attempt).  Use
    it to drop routes that are down, over budget or not allowed offline, and to
    put the preferred ones first.

    :param turn: the turn.
    :param routes: the candidate routes as the previous implementation left
        them (at first: every configured route not yet tried in this turn).
    :param pipeline: the running pipeline.
    :return: ``None`` to keep the routes, or the routes to keep, in order of
        preference.  *Chained*.
    """


@hookspec(firstresult=True)
def select_provider(
    turn: Turn, routes: tuple[Route, ...], attempt: Attempt, pipeline: Pipeline
) -> Route | str | None:
    """Choose the route for the next model call of a turn.

    Called before every model call: once for the first attempt and again after
    each ``Escalate`` or ``Retry``.  The built-in ``default_route`` plugin
    (``trylast``) honours ``turn.route``, then ``turn.model``, then an
    escalation's target or the next tier, then the configured default.

    :param turn: the turn (after ``pre_input``).
    :param routes: the candidates after :func:`filter_routes`.
    :param attempt: the attempt number, what caused it and the routes tried.
    :param pipeline: the running pipeline.
    :return: a :class:`Route` (or the name of a configured route), a
        :class:`RouteChoice` (the route with the reason this stage chose it,
        which reaches ``CallRecord.routing_reason``), or ``None`` for no
        opinion.  Stops at first non-None result.
    """


@hookspec
def before_call(
    turn: Turn, route: Route, attempt: Attempt, pipeline: Pipeline
) -> Route | Block | None:
    """Last word before a model call: reserve budget, enforce policy, downgrade.

    Called once per model call (each attempt), after :func:`select_provider`
    chose ``route`` and before the request is sent.  A stage that reserves
    something here (budget, quota) settles it in :func:`record_cost`, which
    follows every call made.  If a later implementation blocks, no call is
    made and no record follows: reserve in a ``trylast`` implementation.

    :param turn: the turn.
    :param route: the route chosen, as the previous implementation left it.
    :param attempt: which attempt this is.
    :param pipeline: the running pipeline.
    :return: ``None`` to proceed; another :class:`Route` to call instead
        (e.g. a cheaper one); a :class:`RouteChoice` to give the reason for
        the route (the same one or another), joined into
        ``CallRecord.routing_reason``; a :class:`Block` to refuse the call (the
        turn ends blocked).  *Chained*.
    """


# --------------------------------------------------------------------------
# Phase 3: response
# --------------------------------------------------------------------------


@hookspec
def on_response(
    turn: Turn,
    route: Route,
    response: Response | None,
    error: ProviderError | None,
    attempt: Attempt,
    pipeline: Pipeline,
) -> Decision | None:
    """Judge the outcome of a model call: accept, retry, escalate or block.

    Called after every model call of a turn, once the transport-level retries
    of that call are spent: with ``response`` set when it succeeded, with
    ``error`` set when it failed.  The pipeline loops on ``Retry`` and
    ``Escalate`` up to ``max_attempts`` calls per turn.

    :param turn: the turn.
    :param route: the route that was called.
    :param response: the complete response, or ``None`` if the call failed.
    :param error: the typed error, or ``None`` if the call succeeded.
    :param attempt: which attempt this was.
    :param pipeline: the running pipeline.
    :return: ``None`` or :class:`Accept` to keep the response (on an error,
        ``None`` lets the error propagate); :class:`Retry`,
        :class:`Escalate` or :class:`Block`.  *Collected*: the strongest
        decision wins (``Block`` > ``Escalate`` > ``Retry`` > ``Accept``); among
        equals, the first in call order.
    """


# --------------------------------------------------------------------------
# Phase 4: output
# --------------------------------------------------------------------------


@hookspec
def post_output(turn: Turn, output: Output, pipeline: Pipeline) -> str | Rewrite | Block | None:
    """Inspect, rewrite or block the output before it reaches the caller.

    Called once per turn on the accepted response (with the ``buffer``
    release policy), or once per sentence and once more on the whole answer
    (``sentence`` policy, streaming only).  A response that asks for tool
    calls is checked too when it carries text (``output.response.tool_calls``
    says so); one of tool calls alone is not.  While any implementation
    exists, streamed output is held back until it has passed.

    :param turn: the turn.
    :param output: the text to judge (``output.final`` says whether it is the
        whole answer).
    :param pipeline: the running pipeline.
    :return: ``None`` to pass it; a string (or :class:`Rewrite` whose value is
        one) to replace the text; a :class:`Block` to withhold it.  *Chained*.
    """


# --------------------------------------------------------------------------
# Phase 5: cost
# --------------------------------------------------------------------------


@hookspec
def record_cost(record: CallRecord, turn: Turn, pipeline: Pipeline) -> None:
    """Receive the record of one model call.

    Called after every model call, successful, failed, retried, escalated,
    cancelled or blocked, with server-reported token counts where the endpoint
    gave them (streamed calls included) and estimates otherwise.  Keep it
    fast: queue slow writes.

    :param record: the call's record (tokens, cost, latency, outcome, reason).
    :param turn: the turn the call belonged to.
    :param pipeline: the running pipeline.
    :return: nothing.  *Collected* (results are ignored).
    """


# --------------------------------------------------------------------------
# Around turns: fan-out and route state
# --------------------------------------------------------------------------


@hookspec
def fanout_delay(turn: Turn, pipeline: Pipeline) -> float | None:
    """Say how long a fan-out turn should wait before it starts.

    Called by :meth:`Pipeline.map` and :meth:`Pipeline.amap` for each turn
    of a batch, once it holds its concurrency slot and before it runs: the
    way a stage that watches endpoint load (queue depth, 429s) slows a batch
    down without knowing who runs it.

    :param turn: the turn about to start.
    :param pipeline: the running pipeline.
    :return: seconds to wait (``None`` or ``0`` for none).  *Collected*: the
        largest delay wins; negative, NaN and infinite values count as ``0``.
    """


@hookspec
def route_usable(route: Route, pipeline: Pipeline) -> bool | None:
    """Say whether a route can take a call now (for reports and other stages).

    The way a stage that knows endpoint state (up, loading, circuit open)
    tells the others without being found by name.

    :param route: the route asked about.
    :param pipeline: the running pipeline.
    :return: ``False`` when it cannot, ``True`` or ``None`` otherwise.
        *Collected*: the route is usable unless some implementation says
        ``False``.
    """


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


@hookspec
def register_commands(commands: CommandRegistry) -> None:
    """Add ``nimpipe`` subcommands.

    Called once when the ``nimpipe`` command line starts, on the built-in
    stage modules and the modules of installed ``nimpipe`` entry points,
    before any config is read.  Keep it cheap: import what a command needs
    when it runs.

    :param commands: the registry to add commands to
        (:meth:`CommandRegistry.add` returns an :class:`argparse.ArgumentParser`
        for the command's options).
    :return: nothing.  *Collected*.
    """
