"""`speccompile bench --streams 1,2,4,8`: the same requests served one after another, then by N concurrent streams.

Each request is one prompt decoded greedily with the bundle's first chosen drafter, whatever --temperature the
methods sample at (the section's `decoding` says so). The sequential run is the
reference: every stream's tokens should equal it (`identical`; `identical_share` of the requests: a float near-tie
may go either way between a one-row pass and a shared one, docs/guarantees.md "Threads"), and each N's aggregate
tokens/s is divided by its aggregate tokens/s in the same run (`speedup_vs_sequential`: the machine's speed cancels
out; the CI gate reads it). With repeats R, the sequential run and the N-stream runs alternate R times: the ratio is
the median of the R neighbouring pairs' (each kept in `round_speedups`), the figures those of the fastest run. Per
request: time to first token (from its submission, so queueing for a slot counts) and time per output token after
the first, as percentiles over the requests. The run one after another also gives `first_token_share`, the share of
its time before the requests' first tokens: their prompts' prefill, which sharing passes cannot make cheaper. With a
batched graph each run also keeps its scheduler rounds by kind (`rounds`: slots decoding, a prompt chunk or not;
rounds, seconds, tokens), and the text says how much of an N-stream run all N slots decoded together, at what speed
against the run one after another's decoding, and what fewer slots and the prompts took.
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from speccompile.bench.methods import split_method
from speccompile.errors import SpeccompileError

PERCENTILES = (50, 90, 99)


def serve(gen, requests: list[list[int]], max_new_tokens: int, streams: int, drafter: str | None,
          tree: str | None = None) -> dict:
    """Serve `requests` with `streams` threads, each taking the next request when it finishes one (streams=0:
    one after another in this thread). Returns the run's figures and each request's tokens."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(len(requests)):
        todo.put(i)
    results: list[dict | None] = [None] * len(requests)
    errors: list[BaseException] = []
    stopping = threading.Event()

    def on_text(_text: str) -> None:  # each request's reader: ends it at once when the run is interrupted
        if stopping.is_set():
            raise _Interrupted

    def worker():
        try:
            while not stopping.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                r = gen.generate(requests[i], max_new_tokens, drafter=drafter, tree=tree, on_text=on_text)
                results[i] = {"token_ids": r.token_ids, "ttft_s": r.stats["ttft_s"], "total_s": r.stats["total_s"]}
        except _Interrupted:
            return
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    before, kinds_before = sharing(gen), round_kinds(gen)
    t0 = time.perf_counter()
    if streams == 0:
        worker()
    else:
        _run_threads(worker, streams, stopping)
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    out = figures(results, wall) | {k: v - before[k] for k, v in sharing(gen).items()}
    if kinds_before is not None:
        out["rounds"] = rounds_since(kinds_before, round_kinds(gen))
    if streams == 0:  # one after another, the time before each request's first token is its prompt's prefill
        out["first_token_share"] = sum(r["ttft_s"] for r in results) / wall if wall > 0 else 0.0
    return out


def sharing(gen) -> dict:
    """What the scheduler has shared so far: target passes of several sequences, and drafters' catch-up passes of
    several slots (runtime/shared_catch_up.py); empty without a batched graph."""
    s = getattr(gen, "scheduler", None)
    return {"shared_passes": s.shared_passes, "shared_catch_ups": s.catch_ups.passes} if s is not None else {}


def round_kinds(gen) -> dict | None:
    """The scheduler's rounds so far by kind (runtime/scheduler.py RoundTally); None without a batched graph."""
    s = getattr(gen, "scheduler", None)
    return s.rounds.snapshot() if s is not None else None


def rounds_since(before: dict, after: dict) -> list[dict]:
    """A run's rounds by kind, most slots decoding first: rounds, seconds and tokens committed."""
    out = []
    for (decoding, prompt), (n, seconds, tokens) in sorted(after.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        n0, s0, t0 = before.get((decoding, prompt), (0, 0.0, 0))
        if n > n0:
            out.append({"decoding": decoding, "prompt": prompt, "rounds": n - n0, "seconds": seconds - s0,
                        "tokens": tokens - t0})
    return out


def decoding_speed(rounds: list[dict], slots: int) -> tuple[float, int]:
    """Seconds and tokens of the rounds where `slots` slots decoded and no prompt chunk ran."""
    full = [r for r in rounds if r["decoding"] == slots and not r["prompt"]]
    return sum(r["seconds"] for r in full), sum(r["tokens"] for r in full)


def round_shares(run: dict, streams: int) -> dict | None:
    """A run's time by its rounds, as shares of its wall time: `full` (all its streams decoding, or as many slots as
    the batched graph has), `fewer` slots, a `prompt` chunk, and the `rest` (between rounds); `slots`, the full
    rounds' slot count. None where the run kept no rounds (no batched graph)."""
    rounds, wall = run.get("rounds"), run.get("wall_s", 0.0)
    if not rounds or wall <= 0:
        return None
    most = min(streams, max(r["decoding"] for r in rounds))
    full = decoding_speed(rounds, most)[0]
    fewer = sum(r["seconds"] for r in rounds if r["decoding"] < most and not r["prompt"])
    prompt = sum(r["seconds"] for r in rounds if r["prompt"])
    return {"slots": most, "full": full / wall, "fewer": fewer / wall, "prompt": prompt / wall,
            "rest": max(0.0, wall - full - fewer - prompt) / wall}


def time_by_round(run: dict, streams: int, sequential: dict) -> str | None:
    """Where a run's time went (round_shares), with the full rounds' tokens/s against the run one after another's
    decoding rounds; None where the run kept no rounds."""
    shares = round_shares(run, streams)
    if shares is None:
        return None
    most = shares["slots"]
    full_s, full_tokens = decoding_speed(run["rounds"], most)
    seq_s, seq_tokens = decoding_speed(sequential.get("rounds") or [], 1)
    speed = f" at {full_tokens / full_s:.1f} tok/s" if full_s > 0 else ""
    if full_s > 0 and seq_s > 0 and seq_tokens:
        speed += f" ({full_tokens / full_s / (seq_tokens / seq_s):.2f}x one after another's decoding)"
    return (f"time by round: {most} slot{'s' if most > 1 else ''} decoding {shares['full']:.0%}{speed}, fewer "
            f"{shares['fewer']:.0%}, with a prompt's chunk {shares['prompt']:.0%}, between rounds {shares['rest']:.0%}")


class _Interrupted(Exception):
    """Raised in a request's reader to end it: the run it belongs to was interrupted."""


def _run_threads(worker, streams: int, stopping: threading.Event) -> None:
    """`streams` threads running `worker`, waited for on a semaphore of their own rather than by Thread.join: an
    interrupted join (Ctrl-C) marks a thread that is still running as stopped (Python 3.11), the interpreter then
    tears itself down under it while it is inside onnxruntime, and the process aborts (SIGABRT) instead of exiting
    130. Interrupted, the threads end their requests at their next text and the interpreter waits for them."""
    finished = threading.Semaphore(0)

    def run():
        try:
            worker()
        finally:
            finished.release()

    for _ in range(streams):
        threading.Thread(target=run).start()
    try:
        for _ in range(streams):
            finished.acquire()
    except BaseException:
        stopping.set()
        raise


def figures(results: list[dict], wall: float) -> dict:
    tokens = sum(len(r["token_ids"]) for r in results)
    ttft = [r["ttft_s"] for r in results]
    tpot = [(r["total_s"] - r["ttft_s"]) / (len(r["token_ids"]) - 1) for r in results if len(r["token_ids"]) > 1]
    pct = lambda xs: {f"p{q}": float(np.percentile(xs, q)) if xs else None for q in PERCENTILES}  # noqa: E731
    return {"wall_s": wall, "new_tokens": tokens, "tokens_per_second": tokens / wall if wall > 0 else 0.0,
            "ttft_s": pct(ttft), "time_per_output_token_s": pct(tpot),
            "token_ids": [r["token_ids"] for r in results]}


def check_stream_counts(streams: tuple[int, ...]) -> None:
    """Each stream count at least 1, and named once: one named twice would be served twice, one run kept."""
    if any(n < 1 for n in streams):
        raise SpeccompileError(f"--streams {','.join(map(str, streams))}: stream counts must be at least 1")
    if len(set(streams)) != len(streams):
        raise SpeccompileError(f"--streams {','.join(map(str, streams))}: a stream count is named twice; give each "
                               "once")


def measure_concurrency(gen, prompts: list[dict], max_new_tokens: int, streams: tuple[int, ...], requests: int,
                        method: str | None, repeats: int = 1, log=lambda msg: None,
                        on_run=lambda label: None) -> dict:
    """The concurrency section of a bench result (see the module docstring); method: a drafter, as NAME[@TREE].
    on_run is called after each timed serving run (the progress bar's)."""
    drafter, tree = split_method(method) if method else (None, None)
    check_stream_counts(streams)
    ids = [list(map(int, p["ids"])) for p in prompts[:requests]]
    if not ids:
        raise SpeccompileError("--streams: no prompts to serve")
    gen.generate(ids[0], min(8, max_new_tokens), drafter=drafter, tree=tree)  # warm-up
    if max(streams) > 1:  # and every sequence slot of the batched graph: the first pass of all the slots' prompts
        # together is much slower the first time in a process (docs/results.md), which no timed run should pay
        serve(gen, ids, min(8, max_new_tokens), max(streams), drafter, tree)
    runs = []
    for _ in range(repeats):  # each repeat: one after another, then each N, so a ratio's two runs are neighbours
        log(f"serving {len(ids)} requests one after another, then with {', '.join(map(str, streams))} streams")
        seq = serve(gen, ids, max_new_tokens, 0, drafter, tree)
        on_run("serving one after another")
        by_n = {}
        for n in streams:
            by_n[n] = serve(gen, ids, max_new_tokens, n, drafter, tree)
            on_run(f"serving {n} streams")
        runs.append((seq, by_n))
    sequential = max((seq for seq, _ in runs), key=lambda r: r["tokens_per_second"])
    # greedy whatever the result's settings sample at: said here, so that the section is not read as sampled
    out = {"drafter": method, "decoding": "greedy", "requests": len(ids), "max_new_tokens": max_new_tokens,
           "repeats": repeats, "batched_graph": gen.scheduler is not None, "sequential": sequential, "streams": {}}
    for n in streams:
        run = max((by_n[n] for _, by_n in runs), key=lambda r: r["tokens_per_second"])  # best of the repeats
        same = [a == b for a, b in zip(run["token_ids"], sequential["token_ids"])]
        run["identical"], run["identical_share"] = all(same), sum(same) / len(same)
        # the median over repeats of the ratio to the sequential run beside it; each round's kept beside it
        run["round_speedups"] = [by_n[n]["tokens_per_second"] / seq["tokens_per_second"] for seq, by_n in runs]
        run["speedup_vs_sequential"] = float(np.median(run["round_speedups"]))
        out["streams"][str(n)] = run
    return out


def format_concurrency(section: dict) -> str:
    seq = section["sequential"]
    prefill = seq.get("first_token_share")  # absent from results written before it was measured
    lines = [f"concurrency: {section['requests']} requests x {section['max_new_tokens']} tokens, greedy, drafter "
             f"{section['drafter'] or 'none'}; one after another {seq['tokens_per_second']:.1f} tok/s"
             + (f", its prompts' prefill {prefill:.0%} of its time" if prefill is not None else ""),
             f"{'streams':>8s} {'tok/s':>8s} {'vs seq':>7s} {'TTFT p50/p90 s':>16s} {'TPOT p50/p90 ms':>16s}  identical"]
    for n, r in section["streams"].items():
        t, p = r["ttft_s"], r["time_per_output_token_s"]
        tpot = f"{p['p50'] * 1e3:.1f}/{p['p90'] * 1e3:.1f}" if p["p50"] is not None else "-"
        ttft = f"{t['p50']:.2f}/{t['p90']:.2f}"
        lines.append(f"{n:>8s} {r['tokens_per_second']:8.1f} {r['speedup_vs_sequential']:6.2f}x {ttft:>16s} "
                     f"{tpot:>16s}  {r['identical']}")
        if len(r.get("round_speedups", ())) > 1:
            lines.append(f"{'':>8s} rounds (vs seq): {' '.join(f'{x:.2f}' for x in r['round_speedups'])}")
        if "shared_passes" in r:
            lines.append(f"{'':>8s} passes shared by several sequences: {r['shared_passes']}; drafters' catch-ups "
                         f"shared: {r['shared_catch_ups']}")
        by_round = time_by_round(r, int(n), seq)
        if by_round:
            lines.append(f"{'':>8s} {by_round}")
    return "\n".join(lines)
