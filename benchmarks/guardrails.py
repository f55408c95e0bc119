"""Guardrails per turn: concurrent vs sequential input checks; rails-only vs guarded generation.

What it measures
    Part 1 (no NeMo needed): the input check is NemoGuard content safety, a
    NIM-shaped test server answering after ``--check-delay`` seconds (0.3);
    the agent's model is another answering after ``--model-delay`` (0.5).
    Output checks are off, so a guarded turn is one input check plus one model
    call.  Each round runs, in rotating order, with ``Pipeline.arun``:

    * ``model alone``: the turn without guardrails;
    * ``check alone``: the content-safety check by itself;
    * ``concurrent``: the guarded turn, the check alongside the model call;
    * ``sequential``: the guarded turn, the check first;
    * ``blocked, concurrent`` / ``blocked, sequential``: a turn whose input
      the check blocks.

    Part 2 (the real NeMo Guardrails server, in its own venv): the
    self-check rails ask a judge answering after ``--judge-delay`` (0.05 s);
    the main model answers after ``--model-delay``.  Compared, per round:

    * ``rails-only: input check`` and ``rails-only: output check``: one
      ``POST /v1/checks`` each;
    * ``guarded generation``: one ``POST /v1/chat/completions`` with
      ``guardrails.config_id`` (input rail, generation, output rail on the
      server);
    * ``nimpipe turn, rails-only``: a whole pipeline turn with the
      microservice stage (concurrent input check, model call, output check);
    * ``nimpipe turn, guarded generation``: the same turn with
      ``approach = "generation"`` (the model call goes through the server).

How to read it
    Medians over ``--rounds`` rounds (10).  In Part 1, ``ratio to max`` is a
    mode's median over max(check alone, model alone), the ideal being 1.0;
    the concurrent target is at most 1.1x, the sequential turn costs about
    the sum.  In Part 2, the rails-only nimpipe turn against the guarded
    generation shows what the concurrent input check saves on the same
    model; the two rails-only checks alone are the guardrails' own cost.

``--json PATH`` writes the figures; ``--skip-nemo`` leaves Part 2 out (it
needs ``python -m nimpipe.testing.guardrails_server install``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from _common import add_json_argument, percentile, print_table, rotation, write_json

from nimpipe.config import Config
from nimpipe.pipeline import Pipeline
from nimpipe.testing.nim_server import NimServerProcess
from nimpipe.types import Route, Turn
from nimpipe_contrib.guardrails.backends.nemoguard import ContentSafetyBackend

SAFE = json.dumps({"User Safety": "safe"})
UNSAFE = json.dumps({"User Safety": "unsafe", "Safety Categories": "Violence"})
CS_MODEL = "nvidia/llama-3.1-nemoguard-8b-content-safety"

Timed = Callable[[], Awaitable[Any]]


def pipeline_for(model_url: str, stages: Mapping[str, Any]) -> Pipeline:
    config = Config.from_dict({"stages": dict(stages)}, env={}).with_routes(
        Route(name="agent", base_url=model_url, model="agent"), default="agent"
    )
    return Pipeline.create(config, entrypoints=False)


async def measure(
    modes: Mapping[str, Timed], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of every mode, one call of each per round, the order rotating."""
    names = list(modes)
    for i in range(warmup):
        for name in rotation(names, i):
            await modes[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in rotation(names, i):
            started = time.perf_counter()
            await modes[name]()
            times[name].append(time.perf_counter() - started)
    return times


def median(values: list[float]) -> float:
    return percentile(values, 50)


async def part1(args: argparse.Namespace) -> dict[str, Any]:
    with (
        NimServerProcess(model=CS_MODEL, latency=args.check_delay, reply=SAFE,
                         replies={"forbidden": UNSAFE}) as checker,
        NimServerProcess(model="agent", latency=args.model_delay) as model,
    ):  # fmt: skip
        cs = {"base_url": checker.base_url, "model": CS_MODEL}
        common = {"backends": ["content_safety"], "content_safety": cs, "check_output": False}
        plain = pipeline_for(model.base_url, {})
        concurrent = pipeline_for(model.base_url, {"guardrails": {**common}})
        sequential = pipeline_for(
            model.base_url, {"guardrails": {**common, "input_mode": "sequential"}}
        )
        backend = ContentSafetyBackend(base_url=checker.base_url, model=CS_MODEL)
        blocked_ok: list[bool] = []

        async def check_alone() -> None:
            await backend.check_input("hello there", "agent")

        async def blocked(pipeline: Pipeline) -> None:
            result = await pipeline.arun(Turn.create("something forbidden"))
            blocked_ok.append(result.blocked is not None)

        modes: dict[str, Timed] = {
            "model alone": lambda: plain.arun(Turn.create("hello there")),
            "check alone": check_alone,
            "concurrent": lambda: concurrent.arun(Turn.create("hello there")),
            "sequential": lambda: sequential.arun(Turn.create("hello there")),
            "blocked, concurrent": lambda: blocked(concurrent),
            "blocked, sequential": lambda: blocked(sequential),
        }
        try:
            times = await measure(modes, args.rounds)
        finally:
            await backend.aclose()
            for pipeline in (plain, concurrent, sequential):
                pipeline.close()
    assert all(blocked_ok), "a blocked turn was not blocked"
    med = {name: median(values) for name, values in times.items()}
    ideal = max(med["check alone"], med["model alone"])
    rows = []
    for name, value in med.items():
        rows.append([name, f"{value * 1000:.0f}", f"{percentile(times[name], 95) * 1000:.0f}",
                     f"{value / ideal:.3f}"])  # fmt: skip
    print_table(
        f"Part 1: input check {args.check_delay:g} s, model {args.model_delay:g} s "
        f"({args.rounds} rounds, arun)",
        ["mode", "median ms", "p95 ms", "ratio to max"],
        rows,
    )
    ratio = med["concurrent"] / ideal
    print(
        f"\nconcurrent turn / max(check, model) = {ratio:.3f}x (target <= 1.1x); "
        f"sequential = {med['sequential'] / ideal:.3f}x; "
        f"sequential / concurrent = {med['sequential'] / med['concurrent']:.2f}x"
    )
    return {
        "check_delay": args.check_delay,
        "model_delay": args.model_delay,
        "rounds": args.rounds,
        "median_s": med,
        "p95_s": {name: percentile(values, 95) for name, values in times.items()},
        "max_check_model_s": ideal,
        "concurrent_ratio_to_max": ratio,
        "sequential_ratio_to_max": med["sequential"] / ideal,
    }


async def part2(args: argparse.Namespace) -> dict[str, Any] | None:
    from nimpipe.testing import guardrails_server as gs
    from nimpipe_contrib.guardrails.backends.microservice import MicroserviceBackend

    if not gs.is_installed():
        print("\nPart 2 skipped: run `python -m nimpipe.testing.guardrails_server install`")
        return None
    with (
        NimServerProcess(model="judge", latency=args.judge_delay, reply="No") as judge,
        NimServerProcess(model="agent", latency=args.model_delay) as model,
        tempfile.TemporaryDirectory() as tmp,
    ):
        rails = gs.write_self_check_config(
            Path(tmp) / "bench",
            base_url=model.base_url,
            model="agent",
            check_base_url=judge.base_url,
            check_model="judge",
        )
        with gs.start(rails) as server:
            backend = MicroserviceBackend(url=server.url, config_id=server.config_id)
            settings = {"url": server.url, "config_id": server.config_id, "model": "agent"}
            guarded_turn = pipeline_for(model.base_url, {"guardrails": settings})
            generation_settings = {**settings, "approach": "generation"}
            generation_turn = pipeline_for(model.base_url, {"guardrails": generation_settings})
            prompt = "hello there"
            messages = [{"role": "user", "content": prompt}]
            guarded_ok: list[bool] = []

            async def guarded() -> None:
                result = await backend.guarded_completion(messages, "agent")
                guarded_ok.append(not result.blocked and result.text.startswith("NIM reply"))

            async def generation() -> None:
                result = await generation_turn.arun(Turn.create(prompt))
                guarded_ok.append(result.ok and result.text.startswith("NIM reply"))

            modes: dict[str, Timed] = {
                "rails-only: input check": lambda: backend.check_input(prompt, "agent"),
                "rails-only: output check": lambda: backend.check_output(
                    prompt, "NIM reply to: hello there", "agent"
                ),
                "guarded generation": guarded,
                "nimpipe turn, rails-only": lambda: guarded_turn.arun(Turn.create(prompt)),
                "nimpipe turn, guarded generation": generation,
            }
            try:
                times = await measure(modes, args.rounds)
            finally:
                await backend.aclose()
                guarded_turn.close()
                generation_turn.close()
    assert all(guarded_ok), "the guarded generation did not pass"
    med = {name: median(values) for name, values in times.items()}
    rows = [[name, f"{v * 1000:.0f}", f"{percentile(times[name], 95) * 1000:.0f}"]
            for name, v in med.items()]  # fmt: skip
    print_table(
        f"Part 2: NeMo Guardrails server, judge {args.judge_delay:g} s, model "
        f"{args.model_delay:g} s ({args.rounds} rounds)",
        ["mode", "median ms", "p95 ms"],
        rows,
    )
    checks = med["rails-only: input check"] + med["rails-only: output check"]
    ratio = med["guarded generation"] / med["nimpipe turn, rails-only"]
    print(
        f"\nrails-only checks (input + output) {checks * 1000:.0f} ms; guarded generation "
        f"{med['guarded generation'] * 1000:.0f} ms = {ratio:.2f}x the nimpipe rails-only turn"
    )
    return {
        "judge_delay": args.judge_delay,
        "model_delay": args.model_delay,
        "rounds": args.rounds,
        "median_s": med,
        "p95_s": {name: percentile(values, 95) for name, values in times.items()},
        "guarded_over_rails_only_turn": ratio,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Guardrails cost per turn: concurrent vs sequential input checks, "
        "rails-only checks vs guarded generation."
    )
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per mode (10)")
    parser.add_argument("--check-delay", type=float, default=0.3, help="input check, s (0.3)")
    parser.add_argument("--model-delay", type=float, default=0.5, help="model call, s (0.5)")
    parser.add_argument("--judge-delay", type=float, default=0.05, help="rails' judge, s (0.05)")
    parser.add_argument("--skip-nemo", action="store_true", help="leave Part 2 out")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"concurrent_vs_sequential": asyncio.run(part1(args))}
    if not args.skip_nemo:
        results["rails_only_vs_guarded"] = asyncio.run(part2(args))
    write_json(args.json, "guardrails", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
