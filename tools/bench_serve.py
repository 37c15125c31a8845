"""Load benchmark of a running `speccompile serve`: throughput, time to first token and request latency for 1, 4, 8
and 16 concurrent clients, with speculation and without it (the request field `speculate: false`, the same server),
through the OpenAI chat API, streamed.

    speccompile serve bundles/smollm2 --port 8000 &
    python tools/bench_serve.py http://127.0.0.1:8000 --json serve.json --plot serve.png

Each level runs `concurrency` clients that each send --requests streamed greedy chat requests one after another,
prompts taken round-robin from a Spec-Bench-style .jsonl (default: the shipped set). Per request: TTFT (send to the
first content chunk), latency (send to [DONE]), completion tokens and mean accepted tokens from `usage`. Per level:
output tokens/s over the level's wall time, and percentiles. Both modes decode the same prompts; the greedy texts
of the two are compared pairwise (speculation must not change them). Levels alternate modes to share the drift of
a busy machine; the figures are of one run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time

import httpx

from speccompile.bench.prompts import default_dataset, load_questions
from speccompile.errors import SpeccompileError
from speccompile.cli.errors import one_line_errors


async def one_request(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, speculate: bool) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "speculate": speculate}
    t0, ttft, parts, use = time.perf_counter(), None, [], {}
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SpeccompileError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                use = chunk["usage"]
            for choice in chunk.get("choices", ()):
                text = choice["delta"].get("content")
                if text:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    parts.append(text)
    return {"prompt": prompt, "text": "".join(parts), "ttft_s": ttft or 0.0, "latency_s": time.perf_counter() - t0,
            "tokens": use.get("completion_tokens", 0), "mean_accepted": use.get("mean_accepted_tokens", 1.0)}


async def level(url: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int, speculate: bool,
                headers: dict) -> dict:
    async def client(c: int):
        out = []
        for r in range(requests):
            out.append(await one_request(http, url, prompts[(c * requests + r) % len(prompts)], max_tokens,
                                         speculate))
        return out

    async with httpx.AsyncClient(timeout=600, headers=headers) as http:
        t0 = time.perf_counter()
        runs = [x for per in await asyncio.gather(*(client(c) for c in range(concurrency))) for x in per]
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "speculate": speculate, "wall_s": wall, "requests": len(runs),
            "output_tokens_per_s": sum(r["tokens"] for r in runs) / wall,
            "requests_per_s": len(runs) / wall,
            "ttft_s": percentiles([r["ttft_s"] for r in runs]), "latency_s": percentiles([r["latency_s"] for r in runs]),
            "mean_accepted_tokens": statistics.fmean(r["mean_accepted"] for r in runs), "runs": runs}


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(xs)}


def same_texts(levels: list[dict]) -> bool:
    """Greedy answers with and without speculation agree, prompt by prompt."""
    seen: dict[str, str] = {}
    for lv in levels:
        for r in lv["runs"]:
            if seen.setdefault(r["prompt"], r["text"]) != r["text"]:
                return False
    return True


def table(levels: list[dict]) -> str:
    rows = ["| clients | speculation | tokens/s | requests/s | TTFT p50 / p90 (s) | latency p50 / p90 (s) | "
            "mean accepted |", "|---|---|---|---|---|---|---|"]
    for lv in sorted(levels, key=lambda x: (x["concurrency"], not x["speculate"])):
        t, lat = lv["ttft_s"], lv["latency_s"]
        rows.append(f"| {lv['concurrency']} | {'on' if lv['speculate'] else 'off'} | {lv['output_tokens_per_s']:.1f} | "
                    f"{lv['requests_per_s']:.2f} | {t['p50']:.2f} / {t['p90']:.2f} | {lat['p50']:.2f} / "
                    f"{lat['p90']:.2f} | {lv['mean_accepted_tokens']:.2f} |")
    return "\n".join(rows)


def plot(levels: list[dict], title: str, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("output tokens/s", lambda lv: lv["output_tokens_per_s"]),
              ("TTFT p50 (s)", lambda lv: lv["ttft_s"]["p50"]), ("latency p50 (s)", lambda lv: lv["latency_s"]["p50"])]
    for ax, (name, value) in zip(axes, panels):
        for spec, style in ((True, "o-"), (False, "s--")):
            pts = sorted((lv["concurrency"], value(lv)) for lv in levels if lv["speculate"] == spec)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label="speculative" if spec else "plain")
        ax.set_xlabel("concurrent clients")
        ax.set_title(name)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def served_model(url: str, headers: dict) -> str:
    """The model the server serves; a server that is not there (or refuses the key) is bad input, not a bug."""
    try:
        r = httpx.get(url + "/v1/models", headers=headers)
    except httpx.HTTPError as e:
        raise SpeccompileError(f"cannot reach the server at {url}: {e}") from None
    if r.status_code != 200:
        raise SpeccompileError(f"{url}/v1/models: HTTP {r.status_code}: {r.text[:300]}")
    return r.json()["data"][0]["id"]


def speculation_modes(value: str) -> list[bool]:
    """--modes as speculation on (True) / off (False); any other word is refused (it was read as off)."""
    words = [m.strip() for m in value.split(",")]
    if not words or any(m not in ("on", "off") for m in words):
        raise SpeccompileError(f"--modes {value!r}: expected on, off or on,off")
    return [m == "on" for m in words]


@one_line_errors  # bad input (a server not there, a dataset line): one `error:` line, as the CLI gives
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--concurrency", default="1,4,8,16", help="client counts, comma-separated")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dataset", default=None, help="Spec-Bench-style .jsonl (default: the shipped prompts)")
    ap.add_argument("--modes", default="on,off", help="speculation on, off, or both")
    ap.add_argument("--api-key", default=os.environ.get("SPECCOMPILE_API_KEY"))
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--plot", dest="plot_out")
    a = ap.parse_args(argv)
    url = a.url.rstrip("/")
    prompts = [q["text"] for qs in load_questions(a.dataset or default_dataset()).values() for q in qs]
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    modes = speculation_modes(a.modes)
    model = served_model(url, headers)
    asyncio.run(level(url, prompts[:1], 1, 1, 8, True, headers))  # warm-up, untimed
    levels = []
    for c in [int(x) for x in a.concurrency.split(",")]:
        for spec in modes:
            levels.append(asyncio.run(level(url, prompts, c, a.requests, a.max_tokens, spec, headers)))
            print(f"clients {c:>2} speculation {'on ' if spec else 'off'}: "
                  f"{levels[-1]['output_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    title = (f"speccompile serve, model {model}: greedy chat, {a.max_tokens} max tokens, {a.requests} streamed "
             f"request(s) per client, {len(prompts)} prompts; {os.cpu_count()} CPUs ({platform.machine()}), load "
             f"average {os.getloadavg()[0]:.1f} at the end, {time.strftime('%Y-%m-%d')}")
    print(table(levels))
    identical = same_texts(levels)
    print(f"greedy texts identical with and without speculation: {identical}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"title": title, "identical": identical, "levels": levels}, f, indent=1)
    if a.plot_out:
        plot(levels, title, a.plot_out)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
