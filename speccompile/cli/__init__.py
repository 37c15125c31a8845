"""The `speccompile` command: build, generate, inspect, bench, gate, serve, train-head.

Every failure prints one `error:` line and exits 2 (`gate` exits 1 on a regression)."""
from __future__ import annotations

import functools
import json
import random
import signal
import sys

import click

from speccompile.errors import SpeccompileError
from speccompile.graphs import DEFAULT_MAX_BATCH
from speccompile.cli.errors import DEBUG_ENV, errors_to_exit, OneLineUsageErrors
from speccompile.cli.bench_options import STREAM_REQUESTS, check_bench_options
from speccompile.cli.generate_options import (CACHE_BYTES, STOP_HELP, check_cache_options, check_generate_options,
                                             unescape_stop)
from speccompile.train.cli_options import train_head_options


def _progress(msg: str) -> None:
    click.echo(msg, err=True)


def device_options(command):
    """--device and --backend, as generate and serve take them."""
    backend = click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
                           show_default=True,
                           help="tensorrt: the bundle's TensorRT engines (build --backend tensorrt) on the GPU.")
    command = backend(command)
    return click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                        help="cuda: onnxruntime's CUDA provider, the KV caches in GPU memory (docs/gpu.md).")(command)


def context_cache_options(command):
    """--no-context-cache, --cache-bytes and --cache-dir, as generate and serve take them."""
    for option in reversed([
            click.option("--no-context-cache", is_flag=True,
                         help="Do not reuse the K/V of prompt prefixes seen before."),
            click.option("--cache-bytes", default=CACHE_BYTES, show_default=True, help="Memory for the context cache."),
            click.option("--cache-dir", type=click.Path(), default=None,
                         help="Also keep the context cache here, across runs (replicas may share it).")]):
        command = option(command)
    return command


def runtime_device(device: str, backend: str) -> str:
    """The runtime's device name: cpu, cuda, or tensorrt (TensorRT engines, on the GPU)."""
    return "tensorrt" if backend == "tensorrt" else device


@click.group(cls=OneLineUsageErrors)
@click.version_option(package_name="speccompile")
@click.option("--debug", is_flag=True, help=f"Print the traceback of a failure (also: {DEBUG_ENV}=1).")
def main(debug):
    """Compile a model and its drafters into static ONNX graphs; decode speculatively from the bundle."""


@main.command()
@click.argument("model", required=False, default=None)
@click.option("--out", "-o", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option("--draft", "drafts", multiple=True,
              help="Drafter: mtp[:PATH] | model:PATH | lookup[:N] | layerskip:L | eagle:PATH | eagle3:PATH | "
                   "medusa:PATH | none. Repeat for several. "
                   "Default: the MTP head shipped for the target, if any, then lookup.")
@click.option("--max-seq-len", type=int, default=None,
              help="Static KV cache length (prompt + output) [default: 2048, or the model's context if shorter].")
@click.option("--num-draft", type=int, default=None,
              help="Tokens each drafter proposes per verify pass, 1-16, as a chain [default: 4; MTP heads: the "
                   "tree dynamic:2+lookup:6 over a float32 target, adaptive+lookup:6 over a 4-bit one, unless "
                   "--num-draft or --tree is given].")
@click.option("--attention", type=click.Choice(["ort", "reference"]), default="ort", show_default=True,
              help="TreeAttention lowering: onnxruntime's fused kernel, or standard ONNX ops only.")
@click.option("--tree", default=None, help="Verify a token tree per pass: chain:K | static:FILE.json | dynamic:N | "
              "adaptive[:D], each optionally joined by up to L prompt-lookup nodes with +lookup:L (default: a chain "
              "of --num-draft tokens).")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt: also a TensorRT engine per model, TreeAttention as a plugin (needs TensorRT >= 10, a "
                   "CUDA GPU and the plugin library: plugins/tree_attention/README.md); the bundle's onnxruntime "
                   "graphs then use the reference attention ops.")
@click.option("--head-screen/--no-head-screen", default=True, show_default=True,
              help="Greedy passes find the argmax of the output head through an int8 screen and float32 rescoring "
                   "of its best candidates, certified exact (falling back to the full product when not); so do "
                   "passes sampled at a temperature (with or without top-k), as the argmax of logits plus Gumbel "
                   "noise; ort attention only.")
@click.option("--draft-precision", type=click.Choice(["int8", "float32"]), default="int8", show_default=True,
              help="Weights of draft heads (MTP, EAGLE, Medusa; not DeepSeek-V3's own MTP module): int8 reads a "
                   "quarter of the bytes per drafting pass (drafts need not be exact: the target verifies them).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Graphs, weights and KV caches (norms and softmax accumulate in float32): float16 for GPUs, "
                   "bfloat16 for the CUDA provider only.")
@click.option("--weights", type=click.Choice(["source", "float32", "int8", "int4"]), default="source",
              show_default=True, help="The target's layer matrices: source keeps a quantized GGUF's blocks (its "
              "weights exactly; products round activations to 8 bits, as llama.cpp does; a float checkpoint stays "
              "float32); float32 dequantizes them; int8/int4 quantize float weights block-wise (lossy; a quantized "
              "GGUF's blocks are rounded again). build lists each matrix that stays float32 and why.")
@click.option("--max-batch", type=int, default=DEFAULT_MAX_BATCH, show_default=True,
              help="Sequence slots of the batched target graph that concurrent requests share passes through "
                   "(1: none; built for float32 dense models without sliding windows, ort attention: other bundles "
                   "serialize calls as with 1).")
@errors_to_exit
def build(model, out, drafts, max_seq_len, num_draft, attention, tree, force, backend, head_screen, draft_precision,
          dtype, weights, max_batch):
    """Compile MODEL (a Hugging Face directory, a .gguf file; default: the embedded SmolLM2-135M-Instruct)."""
    # SIGTERM (a kill, a CI timeout) as an exit: the build's cleanup then removes its lock and temporary folder and
    # leaves an earlier bundle as it was, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        from speccompile.compile.driver import build_bundle
        build_bundle(model, out, list(drafts) or None, max_seq_len=max_seq_len, num_draft=num_draft,
                     attention=attention, fused=attention == "ort", overwrite=force, tree=tree, backend=backend,
                     head_screen=head_screen, draft_precision=draft_precision, dtype=dtype, weights=weights,
                     max_batch=max_batch, progress=_progress)
    except ModuleNotFoundError as e:  # a runtime-only install (pip install speccompile, without [build])
        if e.name not in BUILD_DEPENDENCIES:
            raise
        raise SpeccompileError(f'build needs {e.name}, which is not installed: pip install "speccompile[build]"') \
            from None


@main.command()
@click.argument("bundle", type=click.Path())
@click.argument("prompt")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, help="With --temperature: sample from the k likeliest tokens.")
@click.option("--top-p", default=1.0, show_default=True,
              help="With --temperature: sample from the likeliest tokens whose probabilities sum to p.")
@click.option("--seed", default=None, type=int, help="With --temperature: the same seed, the same output.")
@click.option("--drafter", default=None, help="Which of the bundle's drafters (default: its first).")
@click.option("--num-draft", default=None, type=int, help="Override the drafter's tokens per pass.")
@click.option("--tree", default=None, help="Draft this tree instead of the bundle's (`inspect` shows it; adaptive "
              "drafting in a default build): chain:K | static:FILE | dynamic:N | adaptive[:D] [+lookup:L].")
@click.option("--acceptance", default="exact", show_default=True,
              help="exact, or typical[:EPS[,ALPHA]]: LOSSY typical acceptance when sampling (default 0.09,0.3).")
@click.option("--recalibrate", is_flag=True, help="Measure this machine's cost model for the bundle again.")
@click.option("--no-speculate", is_flag=True, help="Plain autoregressive decoding of the compiled target.")
@click.option("--compare", is_flag=True, help="Also decode without speculation and print the speedup.")
@click.option("--no-chat", is_flag=True, help="Do not apply the chat template.")
@click.option("--system", default=None, help="A system message before PROMPT (through the chat template).")
@click.option("--stop", multiple=True, help=STOP_HELP)
@click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads (default: all cores).")
@device_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@context_cache_options
@errors_to_exit
def generate(bundle, prompt, max_new_tokens, temperature, top_k, top_p, seed, drafter, num_draft, tree, acceptance,
             recalibrate, no_speculate, compare, no_chat, system, stop, threads, device, backend, as_json,
             no_context_cache, cache_bytes, cache_dir):
    """Generate text for PROMPT from BUNDLE, streaming it."""
    from speccompile import load
    check_generate_options(click.get_current_context().params)
    cache = {} if no_context_cache else dict(cache_bytes=cache_bytes, cache_dir=cache_dir)  # given: refused above
    gen = load(bundle, threads=threads, device=runtime_device(device, backend), context_cache=not no_context_cache,
               **cache)
    if compare and not gen.drafters:
        raise SpeccompileError("--compare: this bundle has no drafter, so both runs would decode plainly")
    if recalibrate:
        gen.cost_model(recalibrate=True)
    if system is not None:  # the conversation as token ids: what every call below then decodes from
        prompt = gen.tokenizer.encode_messages([{"role": "system", "content": system},
                                                {"role": "user", "content": prompt}])
    if compare and temperature > 0 and seed is None:  # both runs sample from one seed, so compare token for token
        seed = random.SystemRandom().randrange(2**63)
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=tuple(map(unescape_stop, stop)),
                  chat=not no_chat, drafter=drafter, num_draft=num_draft, tree=tree, acceptance=acceptance)
    # color: the text as the model wrote it, escape sequences too (click strips them where stdout is no terminal)
    on_text = None if as_json else functools.partial(click.echo, nl=False, color=True)
    plain = {**kwargs, "drafter": None, "num_draft": None, "tree": None, "acceptance": None}  # --compare's baseline
    if compare:  # warm both paths up (first runs allocate), so the two timings compare like with like
        gen.generate(prompt, min(4, max_new_tokens), speculate=False, **plain)
        gen.generate(prompt, min(4, max_new_tokens), speculate=not no_speculate, **kwargs)
    res = gen.generate(prompt, max_new_tokens, speculate=not no_speculate, on_text=on_text, **kwargs)
    base = gen.generate(prompt, max_new_tokens, speculate=False, **plain) if compare else None
    if as_json:
        out = {"text": res.text, "token_ids": res.token_ids, "finish_reason": res.finish_reason, "stats": res.stats}
        if base:
            out["autoregressive_stats"] = base.stats
            out["speedup"] = _speedup(res.stats, base.stats)
            out["identical_to_autoregressive"], out["seed"] = base.token_ids == res.token_ids, seed
        click.echo(json.dumps(out))
        return
    s = res.stats
    click.echo("")
    click.echo(f"[{s['new_tokens']} tokens, {s['tokens_per_second']:.1f} tok/s, drafter {s['drafter'] or 'none'}, "
               f"mean accepted tokens {s['mean_accepted_tokens']:.2f} over {s['verify_steps']} verify passes"
               f"{', typical acceptance (lossy)' if s['acceptance'] != 'exact' else ''}]",
               err=True)
    if base:
        b = base.stats
        same = "identical" if base.token_ids == res.token_ids else "DIFFERENT"
        click.echo(f"[autoregressive: {b['tokens_per_second']:.1f} tok/s; speculative speedup "
                   f"{_speedup(s, b):.2f}x; output {same} to autoregressive"
                   f"{f'; seed {seed}' if temperature > 0 else ''}]", err=True)  # a drawn seed, to run it again


def _speedup(spec: dict, plain: dict) -> float:
    """--compare's speedup: tokens per second over plain decoding's (not a ratio of times: two sampled answers,
    typical acceptance's and plain sampling's, may differ in length)."""
    return spec["tokens_per_second"] / plain["tokens_per_second"] if plain["tokens_per_second"] else 0.0


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of every file.")
@errors_to_exit
def inspect(bundle, no_verify):
    """Print a readable summary of BUNDLE."""
    from speccompile.format.bundle import read_manifest
    from speccompile.format.summary import describe
    for line in describe(bundle, read_manifest(bundle, verify_hashes=not no_verify), verified=not no_verify):
        click.echo(line)
    from speccompile.runtime.cost_cache import cached_models  # adaptive drafting's measured costs, if any
    for model in cached_models(bundle):
        for line in model.describe():
            click.echo(line)


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def _ints(option: str, value: str | None) -> list[int]:
    if not all(v.isdigit() for v in _csv(value)):
        raise SpeccompileError(f"{option} {value!r}: expected whole numbers, comma-separated")
    return [int(v) for v in _csv(value)]


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--dataset", type=click.Path(), default=None,
              help="Spec-Bench questions (.jsonl: question_id, category, turns); default: the shipped set.")
@click.option("--categories", default=None, help="Only these categories, comma-separated.")
@click.option("--limit", default=None, type=int, help="At most N prompts, picked round-robin over categories.")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--drafter", "drafters", multiple=True,
              help="Drafter to measure, NAME or NAME@TREE for that drafter through TREE (repeatable, e.g. "
                   "--drafter mtp@chain:3 --drafter mtp@dynamic:4; default: every drafter of the bundle).")
@click.option("--tree", default=None,
              help="Verify this token tree: chain:K | static:FILE | dynamic:N | adaptive[:D] [+lookup:L].")
@click.option("--repeats", default=1, show_default=True, help="Runs per prompt and method; the fastest is kept.")
@click.option("--temperature", default=0.0, show_default=True,
              help="Sample at this temperature (seeded per prompt); NAME~typical methods accept typically (lossy).")
@click.option("--top-k", default=0, show_default=True, help="With --temperature: sample from the k likeliest tokens.")
@click.option("--threads", default=None, type=int, help="Intra-op threads (default: all cores).")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the result document here.")
@click.option("--plot", "plot_out", type=click.Path(), default=None, help="Write a PNG of three panels here.")
@click.option("--compare-transformers", is_flag=True,
              help="Also run the same target (and drafting) through transformers generate.")
@click.option("--multi-turn", type=int, default=None, metavar="TURNS",
              help="Instead: chats of TURNS turns with a long first message (--limit of them, default 3), each with "
                   "and without the context cache: TTFT and cache hits per turn.")
@click.option("--streams", default=None, help="Concurrency mode: serve --stream-requests prompts one after another, "
              "then with each of these numbers of concurrent streams (comma-separated, e.g. 1,2,4,8).")
@click.option("--stream-requests", default=STREAM_REQUESTS, show_default=True,
              help="Requests the concurrency mode serves.")
@click.option("--stream-repeats", default=None, type=int,
              help="Rounds of the concurrency mode; its ratio is their median (default: --repeats).")
@errors_to_exit
def bench(bundle, dataset, categories, limit, max_new_tokens, drafters, tree, repeats, temperature, top_k, threads,
          json_out, plot_out, compare_transformers, multi_turn, streams, stream_requests, stream_repeats):
    """Benchmark BUNDLE: speculative against autoregressive decoding, per prompt category."""
    from speccompile.bench.plot import plot
    from speccompile.bench.report import format_table, write_json
    check_bench_options(click.get_current_context().params)
    if multi_turn is not None:
        from speccompile.bench.multi_turn import MultiTurnSettings, format_multi_turn, run_multi_turn
        result = run_multi_turn(bundle, MultiTurnSettings(dataset, _csv(categories), limit, multi_turn, max_new_tokens,
                                                          drafters[0] if drafters else None, threads), _progress)
        click.echo(format_multi_turn(result))
        if json_out:
            write_json(result, json_out)
            _progress(f"wrote {json_out}")
        return
    from speccompile.bench.run import Benchmark
    from speccompile.bench.settings import BenchSettings
    settings = BenchSettings(dataset=dataset, categories=_csv(categories), limit=limit,
                             max_new_tokens=max_new_tokens, drafters=tuple(drafters), tree=tree, repeats=repeats,
                             threads=threads, compare_transformers=compare_transformers, temperature=temperature,
                             top_k=top_k, streams=tuple(_ints("--streams", streams)), stream_requests=stream_requests,
                             stream_repeats=stream_repeats)
    benchmark = Benchmark(bundle, settings, log=_progress)
    with click.progressbar(length=benchmark.total_runs, label="decoding", file=sys.stderr, show_pos=True,
                           item_show_func=lambda label: label) as bar:
        result = benchmark.run(on_run=lambda label: bar.update(1, label))
    click.echo(format_table(result))
    if "concurrency" in result:
        from speccompile.bench.concurrency import format_concurrency
        click.echo(format_concurrency(result["concurrency"]))
    if json_out:
        write_json(result, json_out)
        _progress(f"wrote {json_out}")
    if plot_out:
        plot(result, plot_out)
        _progress(f"wrote {plot_out}")


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="SPECCOMPILE_API_KEY",
              help="Require 'Authorization: Bearer KEY' (also: $SPECCOMPILE_API_KEY).")
@click.option("--max-queue", default=64, show_default=True, help="Requests in the server at once; past it, 429.")
@click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads (per replica).")
@click.option("--shutdown-timeout", default=10.0, show_default=True, help="Seconds SIGTERM lets requests finish.")
@click.option("--replicas", default=None, type=int, help="Serve N replicas through Ray Serve (the ray extra).")
@click.option("--ray-address", default=None, help="With --replicas: join this Ray cluster (default: a local one).")
@device_options
@context_cache_options
@errors_to_exit
def serve(bundle, replicas, ray_address, device, backend, no_context_cache, **options):
    """Serve BUNDLE over the OpenAI API (/v1/chat/completions, /v1/completions), with /metrics."""
    from speccompile.serve.command import run
    check_cache_options({"no_context_cache": no_context_cache, **options})
    run(bundle, replicas, ray_address, device=runtime_device(device, backend), context_cache=not no_context_cache,
        **options)

@main.command()
@click.argument("result", type=click.Path())
@click.option("--baseline", required=True, type=click.Path(), help="A bench result to compare against.")
@click.option("--max-regression", default="0.05", show_default=True,
              help="Largest allowed drop of a gated figure, as a fraction of its baseline.")
@click.option("--min-speedup", default=None, help="Floor for every drafter's overall speedup.")
@click.option("--min-accepted", default=None, help="Floor for every drafter's mean accepted tokens.")
@click.option("--min-concurrency", default=None, help="Floor for 4 streams' tokens/s over one after another.")
@errors_to_exit
def gate(result, baseline, max_regression, min_speedup, min_accepted, min_concurrency):
    """Fail (exit 1) if RESULT regresses against BASELINE on machine-independent figures.

    Thresholds must be finite numbers >= 0; figures that are missing, not numbers, NaN or infinite (in either file)
    are refused with exit 2, never passed."""
    from speccompile.bench.gate import check_thresholds, format_rows, run_gate
    # Parsed here, not by click, so that a bad value gives the one `error:` line every other bad input gives.
    max_regression, *floors = check_thresholds(max_regression, min_speedup, min_accepted, min_concurrency)
    rows, notes = run_gate(result, baseline, max_regression, *floors)
    click.echo(format_rows(rows))
    for note in notes:
        click.echo(f"note: {note}")
    failed = [r.name for r in rows if r.failure]
    if failed:
        click.echo(f"gate FAILED: {', '.join(failed)}", err=True)
        sys.exit(1)
    click.echo(f"gate passed: {len(rows)} figures within {max_regression:.0%} of the baseline")


TRAIN_DEPENDENCIES = {"torch", "transformers", "safetensors", "accelerate", "tqdm"}
BUILD_DEPENDENCIES = {"onnx", "gguf", "safetensors", "tqdm"}  # the build extra: the runtime does without them


@main.command("train-head")
@train_head_options
@errors_to_exit
def train_head(**options):
    """Train a draft head for a target by self-distillation, on CPU.

    Each stage is skipped when its output already exists in --work (unless --redo names it):

    \b
      gen       the target's own continuations of a prompt set (greedy, and a
                share sampled), with its chat template: WORK/gen.jsonl
                (--gen-bundle: decoded by a compiled bundle, not transformers)
      features  teacher-forced target passes: the residual stream after the
                last layer and the target's top-k next-token distribution at
                every position: WORK/features.npz
      aux       (eagle3) the target's residual stream entering its three
                EAGLE-3 layers at every token: aux.npz beside each features file
      train     the head: AdamW, warmup + cosine lr, distillation over unrolled
                depths plus a feature regression; a checkpoint per epoch
                (--resume continues from the last, --init warm-starts)
      export    float16 safetensors and a JSON record of how it was trained
                (medusa: train and export are one step)
      vocab     (mtp) a reduced draft vocabulary for the exported head: the
                --draft-vocab tokens most frequent in the training responses
                (--draft-vocab-keep: and every token of an earlier head's)

    Needs the train extra: pip install "speccompile[train]".
    """
    # SIGTERM (a kill, a job scheduler's stop) as an exit, as Ctrl-C: a file being written (features.npz, a
    # checkpoint, the head) leaves no temporary copy behind, and the run resumes from what was written whole
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        from speccompile.train.options import DEFAULT_OUT, TrainOptions
        from speccompile.train.pipeline import run
    except ModuleNotFoundError as e:
        if e.name not in TRAIN_DEPENDENCIES:
            raise
        click.echo(f'error: training needs {e.name}, which is not installed: pip install "speccompile[train]"',
                   err=True)
        sys.exit(2)
    stages = set(options["stages"].split(","))
    writes = stages & {"export", "vocab"} or (options["arch"] == "medusa" and "train" in stages)
    if writes and not options["out"] and (options["arch"] != "mtp" or options["target"] is not None):
        raise SpeccompileError("--out is required: the default output is the shipped head of the default model, "
                               "trained with --arch mtp on the default target")
    run(TrainOptions(**{**options, "out": options["out"] or DEFAULT_OUT}))

