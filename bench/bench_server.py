"""Load on ``repo_mlx.server``: sequential and concurrent requests, throughput and latency.

Starts the server on 127.0.0.1 (a free port) with a model, sends --requests
completions one at a time, then the same number from --concurrency client
threads, and stops the server. For each phase it reports requests/s, generated
tokens/s (from the replies' usage) and p50/p95 latency of whole replies; with
--stream, also p50/p95 time to the first streamed text. Each request has its
own prompt, so the prompt cache does not answer for it.

    python bench/bench_server.py                              # the tiny test fixture
    python bench/bench_server.py --synthetic small            # random 8-layer RePo model
    python bench/bench_server.py --model PATH --requests 32 --concurrency 8 --max-tokens 64
"""

import argparse
import http.client
import json
import math
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # synthetic.py lives with the tests

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "repo-olmo2-tiny"


def synthetic_model(shape: str, folder: Path) -> Path:
    import synthetic  # tests/synthetic.py

    if shape == "1b":
        cfg = synthetic.config_1b()
    else:
        cfg = synthetic.config(
            hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
            intermediate_size=2048, vocab_size=32000, start_layer=2,
        )
    return synthetic.write_checkpoint(folder / shape, cfg, dtype="bfloat16" if shape == "1b" else "float32")


def start_server(model: Path, timeout: float):
    proc = subprocess.Popen(
        [sys.executable, "-m", "repo_mlx.server", "--model", str(model), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    ready = {}

    def read_first_line():
        ready["line"] = proc.stdout.readline()

    reader = threading.Thread(target=read_first_line, daemon=True)
    reader.start()
    reader.join(timeout)
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", ready.get("line", ""))
    if not match:
        stop_server(proc)
        sys.exit(f"error: the server did not start within {timeout:.0f} s.")
    return proc, int(match.group(1))


def stop_server(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_request(port: int, prompt: str, max_tokens: int, stream: bool) -> dict:
    """Latency, time to first text and generated tokens of one completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    first = None
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
        if not stream:
            usage = json.loads(r.read())["usage"]
        else:
            usage = None
            for line in r:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if first is None and event["choices"] and event["choices"][0].get("text"):
                    first = time.perf_counter() - start
                usage = event.get("usage") or usage
    finally:
        conn.close()
    return {"latency": time.perf_counter() - start, "first": first, "tokens": usage["completion_tokens"]}


def run_phase(port, prompts, max_tokens, concurrency, stream):
    results, errors = [None] * len(prompts), []
    next_index = iter(range(len(prompts)))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                results[i] = one_request(port, prompts[i], max_tokens, stream)
            except Exception as e:  # reported below, never hidden
                errors.append(f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        sys.exit(f"error: {len(errors)} requests failed, e.g. {errors[0]}")
    return wall, results


def percentile(values, p):
    """Nearest-rank percentile."""
    values = sorted(values)
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, default=None, help="Model folder (default: the tiny test fixture).")
    src.add_argument("--synthetic", choices=["small", "1b"], help="Serve a random RePo model of this shape instead.")
    p.add_argument("--requests", type=int, default=32, help="Requests per phase (default: 32).")
    p.add_argument("--concurrency", type=int, default=8, help="Client threads in the concurrent phase (default: 8).")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default: 32).")
    p.add_argument("--prompt-words", type=int, default=20, help="Words in each prompt (default: 20).")
    p.add_argument("--stream", action="store_true", help="Stream the replies and report time to first text too.")
    p.add_argument("--start-timeout", type=float, default=600, help="Seconds to wait for the server (default: 600).")
    args = p.parse_args()
    if min(args.requests, args.concurrency, args.max_tokens, args.prompt_words) < 1:
        sys.exit("error: --requests, --concurrency, --max-tokens and --prompt-words must be at least 1.")

    with tempfile.TemporaryDirectory() as tmp:
        model = synthetic_model(args.synthetic, Path(tmp)) if args.synthetic else (args.model or FIXTURE)
        proc, port = start_server(model, args.start_timeout)
        try:
            for i in range(2):  # warm up: first-use compilation and allocation
                one_request(port, f"warm up {i}", args.max_tokens, args.stream)
            words = ("position", "token", "layer", "head", "context", "learned", "rotary", "model")
            rows = []
            for phase, concurrency in (("sequential", 1), ("concurrent", args.concurrency)):
                prompts = [
                    f"{phase} request {i}: " + " ".join(words[(i + j) % len(words)] for j in range(args.prompt_words))
                    for i in range(args.requests)
                ]
                wall, results = run_phase(port, prompts, args.max_tokens, concurrency, args.stream)
                rows.append((phase, concurrency, wall, results))
        finally:
            stop_server(proc)

    name = f"synthetic {args.synthetic}" if args.synthetic else str(args.model or "tiny fixture")
    print(f"model: {name}; {args.requests} requests per phase, max_tokens {args.max_tokens}, "
          f"{'streamed' if args.stream else 'whole'} replies")
    head = f"{'phase':<11} {'clients':>7} {'wall s':>7} {'req/s':>7} {'gen tok/s':>9} {'p50 ms':>8} {'p95 ms':>8}"
    if args.stream:
        head += f" {'ttft p50':>9} {'ttft p95':>9}"
    print(head)
    for phase, concurrency, wall, results in rows:
        latency = [r["latency"] * 1000 for r in results]
        tokens = sum(r["tokens"] for r in results)
        line = (f"{phase:<11} {concurrency:>7} {wall:>7.2f} {len(results) / wall:>7.2f} {tokens / wall:>9.1f} "
                f"{percentile(latency, 50):>8.1f} {percentile(latency, 95):>8.1f}")
        if args.stream:
            first = [r["first"] * 1000 for r in results if r["first"] is not None]
            line += f" {percentile(first, 50):>9.1f} {percentile(first, 95):>9.1f}" if first else f" {'-':>9} {'-':>9}"
        print(line)


if __name__ == "__main__":
    main()
