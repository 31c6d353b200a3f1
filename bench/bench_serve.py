"""Load bench: `residtap serve` with 1000 packed probes vs the same server with nothing attached.

    python bench/bench_serve.py [--models organism reference] [--clients 1 8 32] [--repeats 3]
                                [--threads 1] [--control] [--window-scale 1] [--out bench/results]

For each model two servers run side by side, each in its own process on its own copy of the
same weights (transformers' continuous batching, greedy, the CPU paged-cache sizes of
`residtap serve`): "plain", with no residtap attached, and "probes", with a bank of 1000 probes
attached (1000 / L random binary probes at each of the model's L layers, packed into one matrix
per layer). Every request to "probes" asks for the scores of 4 of them at every generated
token, so every forward runs the L packed matmuls over the rows that pick a token and reads
the scores back to the host once; "plain" gets the same requests without the extension field.
Both generate the same tokens.

N clients (asyncio + httpx, one process, apart from the servers) send completions back to
back, the same requests to both servers (WINDOW below: how many per window, by model and N):
the organism gets real texts (2-16 words)
and 48 new tokens, the reference model (residtap.benchmark.reference_model, random, vocab
32000) token-id prompts of 8-24 tokens and 64 new tokens, so both servers generate the same
tokens. Windows alternate between the two servers (plain first in even repeats, probes first
in odd ones) and are repeated; throughput is generated tokens / the window's wall time,
latency is per request (end to end). Each server's CPU time (user + system, all threads, from
/proc) over its windows is reported too: on a shared machine it moves far less than wall time;
so are its generation thread's share of it (the forwards and residtap's taps, apart from HTTP)
and the clients' own CPU. `--control` makes the second server plain too and its requests ask
nothing (an A/A run: its "cost" is this bench's noise).
Reported: median tokens/s over repeats, p50 / p99 latency over all requests, the cost (median
over repeats of 1 - probes/plain, paired within a repeat), the CPU cost (probes' server CPU
seconds per token over plain's, all repeats), and the share of the probes server's wall time
spent inside residtap's handlers (engine.timing, from /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROBES_ASKED = 4


class IdTokenizer:
    """Prompts are space-separated token ids; decoding writes them back (no real tokenizer)."""

    eos_token_id = 2
    chat_template = None

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 2))


# -- the server process ------------------------------------------------------------------------
def serve(model_name: str, probes: int, port: int, threads: int) -> None:
    import torch
    import uvicorn

    from residtap.benchmark import random_bank, reference_model
    from residtap.cli.serve import CPU_SIZES
    from residtap.organism import load
    from residtap.serving.server import build_app
    from residtap.sites import layer_sites

    torch.set_num_threads(threads)
    if model_name == "organism":
        model, tok = load()
    else:
        model, tok = reference_model(), IdTokenizer()
    bank = None
    if probes:
        layers = len(layer_sites(model))
        bank = random_bank(model, -(-probes // layers), "all")
    app = build_app(model, tok, bank=bank, name=model_name, **CPU_SIZES)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- the clients -------------------------------------------------------------------------------
def prompts(model_name: str, count: int) -> list[Any]:
    import random

    rng = random.Random(0)
    if model_name == "organism":
        from residtap.organism import read_jsonl

        texts = [row["text"].split() for row in read_jsonl("mood")]
        return [" ".join(rng.choice(texts)[: rng.randint(2, 16)]) for _ in range(count)]
    return [[rng.randrange(3, 32000) for _ in range(rng.randint(8, 24))] for _ in range(count)]


WINDOW = {("organism", 1): 48, ("organism", 8): 192, ("organism", 32): 384,
          ("reference", 1): 6, ("reference", 8): 16, ("reference", 32): 32}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    return _ticks(Path(f"/proc/{pid}/stat")) / os.sysconf("SC_CLK_TCK")


def loop_thread(pid: int) -> Path:
    """/proc's entry of the server's generation thread (transformers' _run_generation_loop: the
    forwards and residtap's taps): its busiest thread other than the main (HTTP) one. Python
    does not name OS threads, so CPU time is what tells them apart."""
    tasks = [t for t in Path(f"/proc/{pid}/task").iterdir() if t.name != str(pid)]
    return max(tasks, key=lambda t: _ticks(t / "stat")) / "stat"


def loop_cpu_seconds(stat: Path) -> float:
    return _ticks(stat) / os.sysconf("SC_CLK_TCK")


def _ticks(stat: Path) -> int:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def window(base: str, model_name: str, asks: list[str] | None, clients: int,
                 total: int, prompt_list: list[Any], pid: int) -> dict[str, Any]:
    import httpx

    new_tokens = 48 if model_name == "organism" else 64
    latencies: list[float] = []
    tokens = 0
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
        before = await metrics(http, base)
        stat = loop_thread(pid)
        cpu0, loop0, client0 = cpu_seconds(pid), loop_cpu_seconds(stat), time.process_time()
        start = time.perf_counter()

        async def client(k: int) -> None:
            nonlocal tokens
            for i in range(k, total, clients):
                body: dict[str, Any] = {"model": model_name, "max_tokens": new_tokens,
                                        "prompt": prompt_list[i % len(prompt_list)]}
                if asks:
                    body["residtap"] = {"probes": asks}
                t0 = time.perf_counter()
                r = await http.post(f"{base}/v1/completions", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                tokens += r.json()["usage"]["completion_tokens"]

        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - start
        cpu, client = cpu_seconds(pid) - cpu0, time.process_time() - client0
        loop = loop_cpu_seconds(stat) - loop0
        after = await metrics(http, base)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {"tokens": tokens, "requests": len(latencies), "wall": wall,
            "tok_s": tokens / wall, "latencies": latencies, "cpu": cpu,
            "client_cpu": client, "loop_cpu": loop,
            "handler_s": delta.get("residtap_handler_seconds_total", 0.0),
            "forwards": delta.get("residtap_forwards_total", 0.0),
            "score_reads": delta.get("residtap_score_reads_total", 0.0)}


async def metrics(http: Any, base: str) -> dict[str, float]:
    text = (await http.get(f"{base}/metrics")).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def start_server(model_name: str, probes: int, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, __file__, "--serve", model_name, "--probes",
                             str(probes), "--port", str(port), "--threads", str(threads)],
                            env=env)


def wait_up(base: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server for {base} exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=5).json()["status"] == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {base} did not come up in {seconds} s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_model(model_name: str, args: argparse.Namespace, port: int) -> list[dict[str, Any]]:
    from residtap.benchmark import random_bank, reference_model
    from residtap.sites import layer_sites

    if model_name == "organism":
        from residtap.organism import load

        model = load()[0]
    else:
        model = reference_model()
    layers = len(layer_sites(model))
    asks = [p.name for p in random_bank(model, -(-args.probes // layers), "all").probes
            [:: max(1, args.probes // PROBES_ASKED)]][:PROBES_ASKED]
    del model
    servers = {"plain": (port, 0), "probes": (port + 1, 0 if args.control else args.probes)}
    if args.control:  # an A/A run: the second server is plain too and asks nothing
        asks = None
    procs = {v: start_server(model_name, n, p, args.threads) for v, (p, n) in servers.items()}
    bases = {v: f"http://127.0.0.1:{p}" for v, (p, _) in servers.items()}
    rows: list[dict[str, Any]] = []
    try:
        for v, proc in procs.items():
            wait_up(bases[v], proc)
        prompt_list = prompts(model_name, 4096)
        for v in servers:  # warm-up, not counted
            asyncio.run(window(bases[v], model_name, asks if v == "probes" else None, 8, 8,
                               prompt_list, procs[v].pid))
        runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for r in range(args.repeats):
            for clients in args.clients:
                order = ["plain", "probes"] if r % 2 == 0 else ["probes", "plain"]
                for v in order:
                    total = round(args.window_scale
                                  * WINDOW.get((model_name, clients), max(clients, 16)))
                    res = asyncio.run(window(bases[v], model_name,
                                             asks if v == "probes" else None, clients, total,
                                             prompt_list, procs[v].pid))
                    runs.setdefault((clients, v), []).append(res)
                    print(f"{model_name} N={clients} repeat {r} {v}: {res['tok_s']:.1f} tok/s, "
                          f"{res['requests']} requests", flush=True)
        for clients in args.clients:
            plain, probed = runs[(clients, "plain")], runs[(clients, "probes")]
            costs = [1 - b["tok_s"] / a["tok_s"] for a, b in zip(plain, probed, strict=True)]
            per_token = {v: sum(r["cpu"] for r in res) / sum(r["tokens"] for r in res)
                         for v, res in (("plain", plain), ("probes", probed))}
            for v, res in (("plain", plain), ("probes", probed)):
                lat = [x for run in res for x in run["latencies"]]
                wall = sum(run["wall"] for run in res)
                rows.append({
                    "model": model_name, "clients": clients, "variant": v,
                    "tok_s": statistics.median(run["tok_s"] for run in res),
                    "tok_s_runs": [round(run["tok_s"], 2) for run in res],
                    "p50_ms": 1000 * percentile(lat, 0.5), "p99_ms": 1000 * percentile(lat, 0.99),
                    "requests": len(lat),
                    "cost": statistics.median(costs) if v == "probes" else None,
                    "cost_runs": [round(c, 4) for c in costs] if v == "probes" else None,
                    "cpu_ms_per_token": 1000 * per_token[v],
                    "client_cpu_ms_per_token": 1000 * sum(r["client_cpu"] for r in res)
                    / sum(r["tokens"] for r in res),
                    "loop_cpu_ms_per_token": 1000 * sum(r["loop_cpu"] for r in res)
                    / sum(r["tokens"] for r in res),
                    "cpu_cost": per_token["probes"] / per_token["plain"] - 1
                    if v == "probes" else None,
                    "handler_share": sum(run["handler_s"] for run in res) / wall,
                    "forwards": sum(run["forwards"] for run in res),
                    "score_reads": sum(run["score_reads"] for run in res),
                })
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(60)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | clients | variant | tok/s (median) | p50 ms | p99 ms | cost, median "
             "[min, max] | server CPU ms/token | CPU cost | of which generation thread | "
             "client CPU ms/token | in residtap's handlers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cost = ("" if row["cost"] is None else f"{100 * row['cost']:+.2f}% "
                f"[{100 * min(row['cost_runs']):+.1f}, {100 * max(row['cost_runs']):+.1f}]")
        share = "" if row["variant"] == "plain" else f"{100 * row['handler_share']:.2f}%"
        cpu_cost = "" if row["cpu_cost"] is None else f"{100 * row['cpu_cost']:+.2f}%"
        lines.append(f"| {row['model']} | {row['clients']} | {row['variant']} | "
                     f"{row['tok_s']:.1f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {cost} | "
                     f"{row['cpu_ms_per_token']:.2f} | {cpu_cost} | "
                     f"{row['loop_cpu_ms_per_token']:.2f} | "
                     f"{row['client_cpu_ms_per_token']:.3f} | {share} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["organism", "reference"],
                   choices=["organism", "reference"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--probes", type=int, default=1000)
    p.add_argument("--window-scale", type=float, default=1.0,
                   help="requests per window = this x WINDOW's count (longer windows, less noise)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each server")
    p.add_argument("--control", action="store_true", help="A/A: the 'probes' server gets no "
                   "bank and its requests ask nothing (the cost column is then the noise)")
    p.add_argument("--port", type=int, default=8750)
    p.add_argument("--out", type=Path)
    p.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run one server
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    if args.serve:
        serve(args.serve, args.probes, args.port, args.threads)
        return
    rows = []
    for i, model_name in enumerate(args.models):
        rows += bench_model(model_name, args, args.port + 2 * i)
    text = table(rows)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_serve.json").write_text(json.dumps(
            {"argv": sys.argv, "rows": rows}, indent=2))
        (args.out / "bench_serve.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
