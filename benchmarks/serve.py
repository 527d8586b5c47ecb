"""Several clients at once: serve.py's continuous batching against llama-cpp-python's server.

    python benchmarks/serve.py benchmarks/work/SmolLM2-135M-Instruct --out benchmarks/RESULTS-serve.md
    python benchmarks/serve.py MODEL_DIR --clients 1 4 --max-tokens 32 --repeats 1 --no-llama-cpp

Four servers run at once on the same weights, each with --threads CPU threads: ours in bfloat16
and with int8 weights (serve.py --quantize int8), and llama-cpp-python's own server (python -m
llama_cpp.server, its [server] extra) on the same weights as BF16 and Q8_0 GGUF files
(MODEL_DIR-BF16.gguf and MODEL_DIR-Q8_0.gguf, written by `make bench-serve`). Within each
repetition, for each number of clients N, every server in turn gets N clients at once: a change
in the machine's load hits them all alike. Each client streams one chat completion (greedy, a
question of its own, up to --max-tokens tokens) over a connection of its own.

Measured at the clients, per stream: the time to first token (request sent -> first chunk with
text) and decode tok/s (tokens after the first / time from the first to the last). Aggregate
decode tok/s: all clients' tokens after their first / (the last token of any client - the first
token of any). A token is a chunk with text: one each in both servers, for this English text.
Figures are medians over the repetitions.
"""

import argparse
import datetime
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import machine  # beside this script

REPO = Path(__file__).resolve().parent.parent

# Each client asks for its own story: greedy answers that run to --max-tokens (64 checked, ours
# in bf16 and int8), so that no client leaves early and every step has all of them.
QUESTIONS = [f"Write a long story about {subject}." for subject in (
    "a dragon", "a lighthouse keeper", "a robot who learns to paint", "a cat who sails across the sea",
    "two friends lost in a forest", "a baker in a small village", "an astronaut on Mars", "a wizard's apprentice")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_servers(model_dir: Path, threads: int, llama_cpp: bool) -> dict:
    """name -> (process, port); every server answering GET /v1/models."""
    ours = [sys.executable, "serve.py", "--model-dir", str(model_dir), "--threads", str(threads), "--slots", "8",
            "--max-seq-len", "1024", "--queue", "64"]
    commands = {"ours-bf16": ours, "ours-int8": [*ours, "--quantize", "int8"]}
    if llama_cpp:
        for precision, gguf in (("BF16", "BF16"), ("Q8_0", "Q8_0")):
            path = model_dir.with_name(f"{model_dir.name}-{gguf}.gguf")
            commands[f"llama-cpp-python-{precision}"] = [
                sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--n_ctx", "1024",
                "--n_threads", str(threads), "--n_threads_batch", str(threads), "--interrupt_requests", "False"]
    servers = {}
    for name, command in commands.items():
        port = free_port()
        host_port = ["--host", "127.0.0.1", "--port", str(port)]
        log = open(REPO / "benchmarks" / "work" / f"serve-{name}.log", "w")
        servers[name] = (subprocess.Popen([*command, *host_port], cwd=REPO, stdout=log, stderr=log), port)
    for name, (process, port) in servers.items():
        wait_until_up(name, process, port)
    return servers


def wait_until_up(name: str, process: subprocess.Popen, port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{name} exited with status {process.returncode}: see benchmarks/work/serve-{name}.log")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/v1/models")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"{name} did not answer within {timeout:.0f} s")


def stream_one(port: int, question: str, max_tokens: int) -> dict:
    """One streamed chat completion: when it was sent, when each token came."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read()[:200]}")
    times = []
    for line in response:  # server-sent events: "data: {...}" lines
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        choices = json.loads(line[6:]).get("choices") or [{}]
        if choices[0].get("delta", {}).get("content"):
            times.append(time.perf_counter())
    connection.close()
    return {"sent": sent, "times": times}


def run_clients(port: int, n: int, max_tokens: int) -> list:
    """n clients at once, each in a thread of its own; their streams."""
    streams = [None] * n

    def client(i):
        streams[i] = stream_one(port, QUESTIONS[i % len(QUESTIONS)], max_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return streams


def summarize(streams: list) -> dict:
    first = min(s["times"][0] for s in streams)
    last = max(s["times"][-1] for s in streams)
    after_first = sum(len(s["times"]) - 1 for s in streams)
    per_client = [(len(s["times"]) - 1) / (s["times"][-1] - s["times"][0]) for s in streams if len(s["times"]) > 1]
    return {"aggregate": after_first / (last - first), "per_client": statistics.median(per_client),
            "ttft": statistics.median(s["times"][0] - s["sent"] for s in streams),
            "ttft_max": max(s["times"][0] - s["sent"] for s in streams),
            "tokens": statistics.mean(len(s["times"]) for s in streams)}


def measure(servers: dict, clients: list, max_tokens: int, repeats: int) -> dict:
    """(server, N) -> [summaries], the servers alternated within each repetition."""
    results = {}
    for name, (_, port) in servers.items():  # a warm-up request each: first-call costs out of the way
        run_clients(port, 1, 8)
    for repeat in range(repeats):
        for n in clients:
            for name, (_, port) in servers.items():
                summary = summarize(run_clients(port, n, max_tokens))
                results.setdefault((name, n), []).append(summary)
                print(f"#{repeat + 1} {name} x{n}: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()),
                      file=sys.stderr, flush=True)
    return results


def table(results: dict, clients: list) -> list:
    lines = ["| server | clients | aggregate decode tok/s | x one client | per-client decode tok/s | "
             "time to first token s (median, max) | tokens per answer |", "|---|---:|---:|---:|---:|---:|---:|"]
    names = list(dict.fromkeys(name for name, _ in results))
    for name in names:
        alone = statistics.median(r["aggregate"] for r in results[(name, clients[0])])
        for n in clients:
            runs = results[(name, n)]

            def median(key):
                return statistics.median(r[key] for r in runs)
            lines.append(f"| {name} | {n} | {median('aggregate'):.1f} | {median('aggregate') / alone:.2f}x | "
                         f"{median('per_client'):.1f} | {median('ttft'):.2f}, {median('ttft_max'):.2f} | "
                         f"{median('tokens'):.0f} |")
    return lines


def ratios(results: dict, n: int) -> list:
    """Ours against llama-cpp-python's server, at n clients, in each precision."""
    lines = []
    for ours, theirs in (("ours-bf16", "llama-cpp-python-BF16"), ("ours-int8", "llama-cpp-python-Q8_0")):
        if (ours, n) in results and (theirs, n) in results:
            a, b = (statistics.median(r["aggregate"] for r in results[(name, n)]) for name in (ours, theirs))
            lines.append(f"- {ours} / {theirs}, {n} clients: aggregate decode {a / b:.2f}x")
    return lines


def software() -> str:
    import torch
    versions = [f"torch {torch.__version__}"]
    try:
        import llama_cpp
        versions.append(f"llama-cpp-python {llama_cpp.__version__}")
    except ImportError:
        pass
    return ", ".join(versions) + f", Python {sys.version.split()[0]}"


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="the model's Meta-format directory; its GGUF files beside it")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=64, help="the most tokens per answer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every server")
    parser.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false", help="our servers only")
    parser.add_argument("--out", type=Path, help="write the markdown results here")
    return parser.parse_args()


def main():
    opts = parse_options()
    (REPO / "benchmarks" / "work").mkdir(exist_ok=True)
    servers = start_servers(opts.model_dir.expanduser().resolve(), opts.threads, opts.llama_cpp)
    load_before, started = os.getloadavg(), datetime.datetime.now()
    try:
        results = measure(servers, opts.clients, opts.max_tokens, opts.repeats)
    finally:
        for process, _ in servers.values():
            process.terminate()
    load_after, minutes = os.getloadavg(), (datetime.datetime.now() - started).total_seconds() / 60
    lines = [
        f"# Serving several clients at once: {opts.model_dir.name}", "",
        f"Command: `python benchmarks/serve.py {' '.join(sys.argv[1:])}`", "",
        f"Machine: {machine.describe()}; {software()}. Date: {started:%Y-%m-%d %H:%M}, {minutes:.0f} min. "
        f"Load average before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
        f"{', '.join(f'{x:.2f}' for x in load_after)}.", "",
        f"Every server: {opts.threads} CPU thread(s). Each client streams one greedy chat completion of up to "
        f"{opts.max_tokens} tokens; medians of {opts.repeats} repetitions, servers alternated. ours: serve.py "
        f"--slots 8 (up to 8 conversations in one decode step); llama-cpp-python: `python -m llama_cpp.server`, "
        f"which answers one request at a time.", "",
        *table(results, opts.clients), "", *ratios(results, 4),
    ]
    machine.publish(lines, opts.out)


if __name__ == "__main__":
    main()
