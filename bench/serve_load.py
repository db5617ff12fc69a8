"""Load test of `chatdistill serve`: streamed completions at growing concurrency against the
same model answering one request at a time with `model.generate`.

Server: the real CLI (`python -m chatdistill.cli serve MODEL --max-batch 32`) on loopback, in its
own process. Load: a closed loop in asyncio + httpx; at concurrency c, c clients each send a
request, read its SSE stream to the end and send the next, until `--requests-per-client * c`
requests are done. Every request streams `POST /v1/completions` with a prompt of exactly
`--prompt-tokens` random token ids, `max_tokens=--output-tokens`, temperature 1 and its own seed,
and `stream_options.include_usage`, so the server reports how many tokens it generated.

Fixed output length: the server has no `ignore_eos`; with a random model and a 4k vocabulary the
end-of-turn token is sampled about once in 4k tokens, so nearly every request runs to
max_tokens. Throughput counts the tokens actually generated (from `usage`), never max_tokens.

Baseline (same run, never while the server runs, so the CPU is not shared): a sequential loop
over the same prompts and seeds, one `model.generate(do_sample=True, temperature=1)` call per
request with the KV cache, no HTTP, timed with a streamer that stamps every new token. This is
the model served one request at a time; its tokens/s does not change with concurrency. It is
measured once before the server starts and once after it stops, and the two are pooled, so a
machine whose load drifts during the run does not favour either side.

    python bench/serve_load.py [--model DIR] [--concurrency 1,4,16,32] [--threads 2]
                               [--max-batch 32] [--max-queue 1024]

Metrics: TTFT (send -> first content chunk), TPOT ((last - first) / (tokens - 1) per request),
ITL (gaps between content chunks), output tokens/s (all tokens / wall time of the level).
"""

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatdistill.models.tokenizer import train_bpe_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.json"


def build_bench_model(out: Path) -> Path:
    """A random-init Llama (4 layers, 256 wide, 4k vocab) with a BPE tokenizer trained on the
    English chatterbot corpus, so decoded text is realistic byte-level BPE."""
    import chatterbot_corpus
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    texts = []
    for f in sorted(root.glob("*.yml")):
        for conv in yaml.safe_load(f.read_text()).get("conversations", []):
            texts += [str(x) for x in conv]
    tok = train_bpe_tokenizer(texts, vocab_size=4096)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summarise(records: list[dict], wall_s: float) -> dict:
    ok = [r for r in records if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    itl = [g for r in ok for g in r["gaps"]]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "rejected_429": sum(r["error"] == "429" for r in records),
        "retry_after": sorted({r["retry_after"] for r in records if r.get("retry_after")}),
        "output_tokens": tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p99_s": pct(tpot, 99),
        "itl_p50_s": pct(itl, 50),
        "itl_p99_s": pct(itl, 99),
        "error_samples": [r["error"] for r in records if r["error"]][:3],
    }


# ------------------------------------------------------------------ server load


async def one_request(
    http: httpx.AsyncClient, url: str, prompt: list[int], args, seed: int
) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": args.output_tokens,
        "temperature": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rec = {"ttft": None, "tpot": None, "gaps": [], "tokens": 0, "error": None}
    t0 = time.perf_counter()
    stamps = []
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code == 429:  # over --max-queue: refused at once, with a retry hint
                rec["error"] = "429"
                rec["retry_after"] = resp.headers.get("retry-after")
                return rec
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    rec["error"] = event["error"]["message"]
                    return rec
                if event.get("usage"):
                    rec["tokens"] = event["usage"]["completion_tokens"]
                if event["choices"] and event["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    if not stamps:
        rec["error"] = "no content"
        return rec
    rec["ttft"] = stamps[0] - t0
    rec["gaps"] = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    if rec["tokens"] > 1:
        rec["tpot"] = (stamps[-1] - stamps[0]) / (rec["tokens"] - 1)
    return rec


async def run_level(url: str, prompts: list[list[int]], concurrency: int, args) -> dict:
    todo = list(enumerate(prompts[: args.requests_per_client * concurrency]))
    records: list[dict] = []
    limits = httpx.Limits(
        max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2
    )
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:

        async def client() -> None:
            while todo:
                i, prompt = todo.pop()
                records.append(await one_request(http, url, prompt, args, seed=i))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarise(records, wall)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, args, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "chatdistill.cli", "serve", str(model), "--port", str(port),
        "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start:\n{log.read_text()}")


# ------------------------------------------------------------------ baseline


def pool(a: dict, b: dict) -> dict:
    """Two baseline runs as one: all their requests over their summed wall time."""
    return summarise(a["records"] + b["records"], a["wall_s"] + b["wall_s"])


def run_baseline(model_dir: Path, prompts: list[list[int]], args) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # warm-up, like the server's: first-call costs stay out of the figures
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)
    records = []
    t_start = time.perf_counter()
    for i, prompt in enumerate(prompts[: args.baseline_requests]):
        torch.manual_seed(i)
        streamer = Stamps()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=args.output_tokens,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                streamer=streamer,
            )
        new = out.shape[1] - len(prompt)
        stamps = streamer.times[1:]  # the first put() is the prompt itself
        records.append(
            {
                "ttft": stamps[0] - t0,
                "tpot": (stamps[-1] - stamps[0]) / (new - 1) if new > 1 else None,
                "gaps": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
                "tokens": new,
                "error": None,
            }
        )
    return {**summarise(records, time.perf_counter() - t_start), "records": records}


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, help="model directory (default: build the bench model)")
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--baseline-requests", type=int, default=6)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument(
        "--max-queue", type=int, default=1024, help="the server's queue bound (429 beyond it)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model_dir = args.model or build_bench_model(work / "model")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    n = max(args.requests_per_client * max(levels), args.baseline_requests)
    prompts = make_prompts(n, args.prompt_tokens, vocab)

    base_before = run_baseline(model_dir, prompts, args)
    proc, url = start_server(model_dir, args, work / "server.log")
    results: dict[str, dict] = {}
    try:
        warm_up = argparse.Namespace(**{**vars(args), "requests_per_client": 2})
        asyncio.run(run_level(url, prompts, 1, warm_up))  # first-call costs stay out of the figures
        for c in levels:
            results[f"c={c}"] = asyncio.run(run_level(url, prompts, c, args))
            print(
                f"  concurrency {c:>3}: {results[f'c={c}']['output_tokens_per_s']:8.1f} tok/s",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    base_after = run_baseline(model_dir, prompts, args)
    base = pool(base_before, base_after)
    print(
        f"  baseline: {base_before['output_tokens_per_s']:.1f} tok/s before the server, "
        f"{base_after['output_tokens_per_s']:.1f} after; pooled {base['output_tokens_per_s']:.1f}"
    )

    print()
    print(
        f"serve load: {args.prompt_tokens}-token prompts, {args.output_tokens} new tokens, "
        f"max batch {args.max_batch}, max queue {args.max_queue}, {args.threads} threads, cpu"
    )
    head = (
        f"{'run':<22}{'req':>5}{'err':>5}{'429':>5}{'tok/s':>9}{'x base':>8}"
        f"{'TTFT p50':>10}{'TTFT p99':>10}"
    )
    head += f"{'TPOT p50':>10}{'ITL p50':>9}{'ITL p99':>9}"
    print(head)
    print("-" * len(head))
    rows = [("baseline model.generate", base)] + [
        (f"server c={c}", results[f"c={c}"]) for c in levels
    ]
    for name, r in rows:
        ratio = r["output_tokens_per_s"] / base["output_tokens_per_s"]
        print(
            f"{name:<22}{r['requests']:>5}{r['errors'] - r.get('rejected_429', 0):>5}"
            f"{r.get('rejected_429', 0):>5}{r['output_tokens_per_s']:>9.1f}"
            f"{ratio:>7.2f}x{r['ttft_p50_s'] * 1e3:>8.0f}ms{r['ttft_p99_s'] * 1e3:>8.0f}ms"
            f"{r['tpot_p50_s'] * 1e3:>8.1f}ms{r['itl_p50_s'] * 1e3:>7.1f}ms"
            f"{r['itl_p99_s'] * 1e3:>7.1f}ms"
        )
        r["ratio_vs_baseline"] = ratio
    goals = {}
    if "c=16" in results:
        r16 = results["c=16"]
        goals = {
            "c16_tokens_per_s_at_least_5x_baseline": r16["ratio_vs_baseline"] >= 5.0,
            "c16_zero_errors": r16["errors"] == 0,
            "c16_ttft_p99_under_2s": r16["ttft_p99_s"] < 2.0,
            "no_errors_at_any_level": all(r["errors"] == 0 for r in results.values()),
        }
        print()
        for goal, met in goals.items():
            print(f"  {'PASS' if met else 'FAIL'}  {goal}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    base["before_after_tokens_per_s"] = [
        base_before["output_tokens_per_s"],
        base_after["output_tokens_per_s"],
    ]
    report = {"settings": settings, "baseline": base, "server": results, "goals": goals}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
