"""What the nimpipe pipeline costs a jaato turn.

The same jaato turn ("hello there", streamed, a fresh history each time)
runs through jaato's own ``nim`` provider and through ``nimpipe`` against the
same local NIM-shaped server (its own process), interleaved (A B B A ...), so
that drift on the machine hits both alike.  Prints, for each provider, the
median wall time of ``JaatoClient.send_message`` and the median CPU time this
process spent on it (the client's own work: jaato, the provider, the openai
SDK; the server runs elsewhere), and the ratios nimpipe / nim.  On a busy
machine the CPU times are the steadier measure.

Needs jaato-server 0.15.0 next to nimpipe (``pip install -e .[jaato]
jaato-server==0.15.0``)::

    python benchmarks/jaato_overhead.py --turns 300
    python benchmarks/jaato_overhead.py --batch --json

nimpipe runs with its built-in stages only (``NIMPIPE_LOAD_PLUGINS`` is
empty): this measures the pipeline itself, not any stage's own work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "meta/llama-3.1-8b-instruct"
PROMPT = "hello there"


def _scratch_environment(server_url: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="nimpipe-jaato-bench-"))
    for name in ("home", "tmp", "ws"):
        (root / name).mkdir()
    os.environ.update(
        HOME=str(root / "home"),
        TMPDIR=str(root / "tmp"),
        JAATO_TELEMETRY_ENABLED="false",
        NIMPIPE_LOAD_PLUGINS="",
        JAATO_NIM_BASE_URL=server_url,
        JAATO_NIM_API_KEY="nvapi-bench",
        JAATO_NIM_MODEL=MODEL,
        JAATO_NIM_CONTEXT_LENGTH="32768",
    )
    tempfile.tempdir = str(root / "tmp")
    return root


def _client(provider: str, registry: Any, workspace: Path, stream: bool) -> Any:
    import jaato

    client = jaato.JaatoClient(
        provider_name=provider,
        workspace_path=str(workspace),
        config_root=str(workspace / ".jaato"),
    )
    client.connect(None, None, MODEL)
    client.verify_auth(allow_interactive=False)
    client.configure_tools(
        registry, None, None, session_kwargs={"plugins": [], "preloaded_plugins": set()}
    )
    client.set_streaming_enabled(stream)
    return client


def _turn(client: Any) -> tuple[float, float]:
    """One turn on a fresh history: (wall seconds, CPU seconds of this process)."""
    client.reset_session()
    cpu = time.process_time()
    started = time.perf_counter()
    answer = client.send_message(PROMPT, on_output=lambda *_: None)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    if answer != f"NIM reply to: {PROMPT}":
        raise SystemExit(f"unexpected answer from {client.provider_name}: {answer!r}")
    return elapsed, cpu


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 3),
        "p90_ms": round(ordered[int(len(ordered) * 0.9)] * 1e3, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=200, help="turns per provider (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed turns each (default 20)")
    parser.add_argument("--batch", action="store_true", help="turn streaming off")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    from nimpipe.testing.nim_server import NimServerProcess

    with NimServerProcess() as server:
        root = _scratch_environment(server.base_url)
        import jaato

        registry = jaato.PluginRegistry(model_name=MODEL)
        registry.discover(tier_filter="runner")
        registry.set_workspace_path(str(root / "ws"))
        clients = {
            name: _client(name, registry, root / "ws", stream=not args.batch)
            for name in ("nim", "nimpipe")
        }
        for _ in range(args.warmup):
            for client in clients.values():
                _turn(client)
        wall: dict[str, list[float]] = {name: [] for name in clients}
        cpu: dict[str, list[float]] = {name: [] for name in clients}
        order = list(clients)
        for i in range(args.turns):
            for name in order if i % 2 == 0 else reversed(order):
                elapsed, spent = _turn(clients[name])
                wall[name].append(elapsed)
                cpu[name].append(spent)
        served = server.count()

    result: dict[str, Any] = {
        "turns": args.turns,
        "stream": not args.batch,
        "requests_served": served,
    }
    for label, times in (("wall", wall), ("cpu", cpu)):
        medians = {name: statistics.median(values) for name, values in times.items()}
        pairs = [b / a for a, b in zip(times["nim"], times["nimpipe"], strict=True) if a > 0]
        result[label] = {
            **{name: _summary(values) for name, values in times.items()},
            "ratio_of_medians": round(medians["nimpipe"] / medians["nim"], 4),
            "median_pair_ratio": round(statistics.median(pairs), 4),
            "added_ms": round((medians["nimpipe"] - medians["nim"]) * 1e3, 3),
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    mode = "streamed" if result["stream"] else "batch"
    print(f"jaato turn ({mode}), {args.turns} per provider, interleaved:")
    for label in ("wall", "cpu"):
        part = result[label]
        for name in clients:
            print(
                f"  {label:4} {name:8} median {part[name]['median_ms']:8.3f} ms"
                f"   p90 {part[name]['p90_ms']:8.3f} ms"
            )
        print(
            f"  {label:4} nimpipe / nim: {part['ratio_of_medians']:.4f}x "
            f"(median of paired ratios {part['median_pair_ratio']:.4f}x, "
            f"{part['added_ms']:+.3f} ms per turn)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
