"""The `speccompile` command: build, generate, inspect, bench, gate.

Every failure prints one `error:` line and exits 2 (`gate` exits 1 on a regression)."""
from __future__ import annotations

import functools
import json
import os
import sys
import traceback

import click

from speccompile.errors import SpeccompileError


def _progress(msg: str) -> None:
    click.echo(msg, err=True)


DEBUG_ENV = "SPECCOMPILE_DEBUG"
REPORT_HINT = ("this is a bug in speccompile: please report it with the command you ran "
               f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback)")


def _debugging() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _fail(message: str, status: int) -> None:
    if _debugging():
        traceback.print_exc()
    click.echo(f"error: {' '.join(str(message).split())}", err=True)  # one line, whatever the message holds
    sys.exit(status)


def _expected_failure(e: Exception) -> str | None:
    """The message of a failure that bad input explains (printed as one `error:` line, exit 2), or None for one
    that only a bug explains."""
    if isinstance(e, SpeccompileError):
        return str(e)
    if isinstance(e, OSError):  # a path that is missing, unreadable, a full disk
        return f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
    if isinstance(e, (ValueError, RecursionError)):  # bad parameters reaching the runtime, bad JSON
        return str(e) or type(e).__name__
    if type(e).__module__.startswith("onnxruntime"):  # its load and run errors share no base class
        return f"onnxruntime: {e}"
    return None


def _check_text_arguments() -> None:
    """A text argument that is not valid UTF-8 reaches Python with surrogate escapes (bytes it could not decode);
    refuse it here rather than deep in the tokenizer. Paths may hold any bytes and are not checked."""
    ctx = click.get_current_context()
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        values = value if isinstance(value, tuple) else (value,)
        if isinstance(param.type, click.Path):
            continue
        for v in values:
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise SpeccompileError(f"{param.human_readable_name} is not valid UTF-8 text (bytes the "
                                           "terminal could not decode); pass it as UTF-8") from None


def _errors_to_exit(fn):
    """Every expected failure: one `error:` line and exit 2. Anything else: one line naming it as a bug with a
    hint to report it, exit 3. The traceback only under --debug or SPECCOMPILE_DEBUG=1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _check_text_arguments()
            return fn(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit):
            raise  # usage errors: click prints them (exit 2)
        except Exception as e:
            message = _expected_failure(e)
            if message is None:
                _fail(f"internal error ({type(e).__name__}: {str(e)[:300]}); {REPORT_HINT}", 3)
            _fail(message, 2)
    return wrapper


@click.group()
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
@click.option("--max-seq-len", default=2048, show_default=True, help="Static KV cache length (prompt + output).")
@click.option("--num-draft", type=int, default=None,
              help="Tokens each drafter proposes per verify pass, as a chain [default: 4; MTP heads: the "
                   "tree dynamic:2+lookup:6 unless --num-draft or --tree is given].")
@click.option("--attention", type=click.Choice(["ort", "reference"]), default="ort", show_default=True,
              help="TreeAttention lowering: onnxruntime's fused kernel, or standard ONNX ops only.")
@click.option("--tree", default=None, help="Verify a token tree per pass: chain:K | static:FILE.json | dynamic:N, each optionally "
              "joined by up to L prompt-lookup nodes with +lookup:L (default: a chain of --num-draft tokens).")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt: also a TensorRT engine per model, TreeAttention as a plugin (needs TensorRT >= 10, a "
                   "CUDA GPU and the plugin library: plugins/tree_attention/README.md); the bundle's onnxruntime "
                   "graphs then use the reference attention ops.")
@click.option("--head-screen/--no-head-screen", default=True, show_default=True,
              help="Greedy passes find the argmax of the output head through an int8 screen and float32 rescoring "
                   "of its best candidates, certified exact (falling back to the full product when not); "
                   "ort attention only.")
@click.option("--draft-precision", type=click.Choice(["int8", "float32"]), default="int8", show_default=True,
              help="Weights of MTP draft heads: int8 reads a quarter of the bytes per drafting pass (drafts need not "
                   "be exact: the target verifies them).")
@_errors_to_exit
def build(model, out, drafts, max_seq_len, num_draft, attention, tree, force, backend, head_screen, draft_precision):
    """Compile MODEL (a Hugging Face directory, a .gguf file; default: the embedded SmolLM2-135M-Instruct)."""
    from speccompile.compile.driver import build_bundle
    build_bundle(model, out, list(drafts) or None, max_seq_len=max_seq_len, num_draft=num_draft, attention=attention,
                 fused=attention == "ort", overwrite=force, tree=tree, backend=backend, head_screen=head_screen,
                 draft_precision=draft_precision,
                 progress=_progress)


@main.command()
@click.argument("bundle", type=click.Path())
@click.argument("prompt")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", default=None, type=int)
@click.option("--drafter", default=None, help="Which of the bundle's drafters (default: its first).")
@click.option("--num-draft", default=None, type=int, help="Override the drafter's tokens per pass.")
@click.option("--tree", default=None, help="Draft this tree instead of adaptive drafting (the default): chain:K | "
              "static:FILE | dynamic:N | adaptive[:D] [+lookup:L].")
@click.option("--acceptance", default="exact", show_default=True,
              help="exact, or typical[:EPS[,ALPHA]]: LOSSY typical acceptance when sampling (default 0.09,0.3).")
@click.option("--recalibrate", is_flag=True, help="Measure this machine's cost model for the bundle again.")
@click.option("--no-speculate", is_flag=True, help="Plain autoregressive decoding of the compiled target.")
@click.option("--compare", is_flag=True, help="Also decode without speculation and print the speedup.")
@click.option("--no-chat", is_flag=True, help="Do not apply the chat template.")
@click.option("--system", default=None, help="A system message before PROMPT (through the chat template).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@_errors_to_exit
def generate(bundle, prompt, max_new_tokens, temperature, top_k, top_p, seed, drafter, num_draft, tree, acceptance,
             recalibrate, no_speculate, compare, no_chat, system, stop, threads, as_json):
    """Generate text for PROMPT from BUNDLE, streaming it."""
    from speccompile import load
    if system is not None and no_chat:
        raise SpeccompileError("--system needs the chat template: drop --no-chat")
    gen = load(bundle, threads=threads)
    if recalibrate:
        gen.cost_model(recalibrate=True)
    if system is not None:  # the conversation as token ids: what every call below then decodes from
        prompt = gen.tokenizer.encode_messages([{"role": "system", "content": system},
                                                {"role": "user", "content": prompt}])
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=tuple(stop),
                  chat=not no_chat, drafter=drafter, num_draft=num_draft, tree=tree, acceptance=acceptance)
    on_text = None if as_json else functools.partial(click.echo, nl=False)
    if compare:  # warm both paths up (first runs allocate), so the two timings compare like with like
        gen.generate(prompt, 4, speculate=False, **kwargs)
        gen.generate(prompt, 4, speculate=not no_speculate, **kwargs)
    res = gen.generate(prompt, max_new_tokens, speculate=not no_speculate, on_text=on_text, **kwargs)
    base = gen.generate(prompt, max_new_tokens, speculate=False, **kwargs) if compare else None
    if as_json:
        out = {"text": res.text, "token_ids": res.token_ids, "stats": res.stats}
        if base:
            out["autoregressive_stats"] = base.stats
            out["speedup"] = res.stats["total_s"] and base.stats["total_s"] / res.stats["total_s"]
            out["identical_to_autoregressive"] = base.token_ids == res.token_ids
        click.echo(json.dumps(out))
        return
    s = res.stats
    click.echo("")
    click.echo(f"[{s['new_tokens']} tokens, {s['tokens_per_second']:.1f} tok/s, drafter {s['drafter']}, "
               f"mean accepted tokens {s['mean_accepted_tokens']:.2f} over {s['verify_steps']} verify passes"
               f"{', typical acceptance (lossy)' if s['acceptance'] != 'exact' else ''}]",
               err=True)
    if base:
        b = base.stats
        same = "identical" if base.token_ids == res.token_ids else "DIFFERENT"
        click.echo(f"[autoregressive: {b['tokens_per_second']:.1f} tok/s; speculative speedup "
                   f"{b['total_s'] / s['total_s']:.2f}x; output {same} to autoregressive]", err=True)


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of every file.")
@_errors_to_exit
def inspect(bundle, no_verify):
    """Print a readable summary of BUNDLE."""
    from speccompile.format.bundle import read_manifest
    from speccompile.format.summary import describe
    for line in describe(bundle, read_manifest(bundle, verify_hashes=not no_verify), verified=not no_verify):
        click.echo(line)
    from speccompile.runtime.cost_model import cached_models  # adaptive drafting's measured costs, if any
    for model in cached_models(bundle):
        for line in model.describe():
            click.echo(line)


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


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
@click.option("--tree", default=None, help="Verify this token tree: chain:K | static:FILE | dynamic:N [+lookup:L].")
@click.option("--repeats", default=1, show_default=True, help="Runs per prompt and method; the fastest is kept.")
@click.option("--temperature", default=0.0, show_default=True,
              help="Sample at this temperature (seeded per prompt); NAME~typical methods accept typically (lossy).")
@click.option("--threads", default=None, type=int, help="Intra-op threads (default: all cores).")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the result document here.")
@click.option("--plot", "plot_out", type=click.Path(), default=None, help="Write a PNG of three panels here.")
@click.option("--compare-transformers", is_flag=True,
              help="Also run the same target (and drafting) through transformers generate.")
@_errors_to_exit
def bench(bundle, dataset, categories, limit, max_new_tokens, drafters, tree, repeats, temperature, threads, json_out,
          plot_out, compare_transformers):
    """Benchmark BUNDLE: speculative against autoregressive decoding, per prompt category."""
    from speccompile.bench.plot import plot
    from speccompile.bench.report import format_table, write_json
    from speccompile.bench.run import Benchmark
    from speccompile.bench.settings import BenchSettings
    settings = BenchSettings(dataset=dataset, categories=_csv(categories), limit=limit,
                             max_new_tokens=max_new_tokens, drafters=tuple(drafters), tree=tree, repeats=repeats,
                             threads=threads, compare_transformers=compare_transformers, temperature=temperature)
    benchmark = Benchmark(bundle, settings, log=_progress)
    with click.progressbar(length=benchmark.total_runs, label="decoding", file=sys.stderr, show_pos=True,
                           item_show_func=lambda label: label) as bar:
        result = benchmark.run(on_run=lambda label: bar.update(1, label))
    click.echo(format_table(result))
    if json_out:
        write_json(result, json_out)
        _progress(f"wrote {json_out}")
    if plot_out:
        plot(result, plot_out)
        _progress(f"wrote {plot_out}")


@main.command()
@click.argument("result", type=click.Path())
@click.option("--baseline", required=True, type=click.Path(), help="A bench result to compare against.")
@click.option("--max-regression", default="0.05", show_default=True,
              help="Largest allowed drop of a gated figure, as a fraction of its baseline.")
@click.option("--min-speedup", default=None, help="Floor for every drafter's overall speedup.")
@click.option("--min-accepted", default=None, help="Floor for every drafter's mean accepted tokens.")
@_errors_to_exit
def gate(result, baseline, max_regression, min_speedup, min_accepted):
    """Fail (exit 1) if RESULT regresses against BASELINE on machine-independent figures.

    Thresholds must be finite numbers >= 0; figures that are missing, not numbers, NaN or infinite (in either file)
    are refused with exit 2, never passed."""
    from speccompile.bench.gate import check_thresholds, format_rows, run_gate
    # Parsed here, not by click, so that a bad value gives the one `error:` line every other bad input gives.
    max_regression, min_speedup, min_accepted = check_thresholds(max_regression, min_speedup, min_accepted)
    rows, notes = run_gate(result, baseline, max_regression, min_speedup, min_accepted)
    click.echo(format_rows(rows))
    for note in notes:
        click.echo(f"note: {note}")
    failed = [r.name for r in rows if r.failure]
    if failed:
        click.echo(f"gate FAILED: {', '.join(failed)}", err=True)
        sys.exit(1)
    click.echo(f"gate passed: {len(rows)} figures within {max_regression:.0%} of the baseline")


TRAIN_DEPENDENCIES = {"torch", "transformers", "safetensors", "accelerate", "tqdm"}


@main.command("train-head")
@click.option("--arch", type=click.Choice(["mtp", "eagle", "eagle3", "medusa"]), default="mtp", show_default=True,
              help="mtp: a DeepSeek-V3 MTP module (--out FILE.safetensors); eagle / eagle3: an EAGLE-1 / EAGLE-3 head "
                   "in its public layout (--out DIR: model.safetensors, config.json, training.json); medusa: Medusa-1 "
                   "heads (--out FILE.safetensors, FILE.json beside it).")
@click.option("--target", default=None, help="Target source: HF dir, .gguf, or default (SmolLM2-135M-Instruct).")
@click.option("--target-name", default="SmolLM2-135M-Instruct", show_default=True,
              help="Recorded in the head's metadata.")
@click.option("--out", default=None, help="Where the head goes [default: the shipped SmolLM2 MTP head's path].")
@click.option("--work", default="/tmp/train_head", show_default=True, help="Data, features and epoch checkpoints.")
@click.option("--stages", default="gen,features,aux,train,export", show_default=True,
              help="Comma-separated; aux runs for eagle3 only, vocab (not run by default) for mtp only.")
@click.option("--redo", default="", help="Stages to redo even if their output exists (comma-separated).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--prompts", default=None, help="jsonl ({\"prompt\": ...} or {\"messages\": [...]}) or text file "
              "[default: speccompile.train.prompts.make_prompts].")
@click.option("--num-prompts", type=int, default=600, show_default=True)
@click.option("--max-new-tokens", type=int, default=160, show_default=True)
@click.option("--sample-frac", type=float, default=0.25, show_default=True,
              help="Share of prompts continued by sampling.")
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--gen-batch", type=int, default=32, show_default=True)
@click.option("--gen-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Precision of the generating target (the text only; features are always float32).")
@click.option("--gen-minutes", type=float, default=20.0, show_default=True, help="Stop generating after this long.")
@click.option("--gen-tokens", type=int, default=0, show_default=True,
              help="Stop generating once the data holds this many tokens (0: no limit).")
@click.option("--aux-layers", default=None,
              help="EAGLE-3: the target layers whose input the head reads (comma-separated) [default: 2, L/2, L-3].")
@click.option("--aux-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="EAGLE-3: precision of the target pass that computes its layer features.")
@click.option("--topk", type=int, default=8, show_default=True,
              help="Target distribution kept per position (distillation).")
@click.option("--holdout", type=float, default=0.05, show_default=True,
              help="Share of sequences held out for evaluation.")
@click.option("--epochs", type=float, default=None, help="[default: 4; medusa: 1.0]")
@click.option("--lr", type=float, default=None, help="[default: 6e-4; medusa: 1e-3]")
@click.option("--min-lr-frac", type=float, default=0.05, show_default=True)
@click.option("--warmup", type=int, default=20, show_default=True)
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--tokens-per-step", type=int, default=None, help="[default: 1024; medusa: 2048]")
@click.option("--depth2-weight", type=float, default=0.5, show_default=True,
              help="Loss weight of each unrolled depth.")
@click.option("--unroll", type=int, default=2, show_default=True,
              help="Depths trained per step: the head fed its own output depth after depth (EAGLE-3's "
                   "training-time test).")
@click.option("--reg-weight", type=float, default=0.1, show_default=True,
              help="Smooth-L1 of norm(o) toward the target's next feature.")
@click.option("--train-minutes", type=float, default=None,
              help="Stop training (and export) after this long [default: 35; medusa: 10].")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--extra-features", default="", help="Comma-separated features.npz of other work dirs to train on "
              "as well (their info.json rounds go into the record).")
@click.option("--init", default=None, help="Start from these weights: a --work's ckpt/final.pt (medusa: an earlier "
              "run's --out).")
@click.option("--resume", is_flag=True, help="Continue training from the last epoch checkpoint in --work.")
@click.option("--full-vocab", is_flag=True, help="Train over the full vocabulary (slower).")
@click.option("--vocab-min-p", type=float, default=None,
              help="Training softmax: tokens in the data or this likely [default: 0.01; medusa: 0.02].")
@click.option("--draft-vocab", type=int, default=8192, show_default=True,
              help="Size of the draft vocabulary: EAGLE-3's head, or stage vocab's for an MTP head.")
@click.option("--heads", type=int, default=3, show_default=True, help="Medusa: number of heads.")
@click.option("--log-every", type=int, default=10, show_default=True)
@click.option("--eval-chain", type=int, default=4, show_default=True,
              help="Draft chain length for the acceptance estimate.")
@_errors_to_exit
def train_head(**options):
    """Train a draft head for a target by self-distillation, on CPU.

    Each stage is skipped when its output already exists in --work (unless --redo names it):

    \b
      gen       the target's own continuations of a prompt set (greedy, and a
                share sampled), with its chat template: WORK/gen.jsonl
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

    Needs the train extra: pip install "speccompile[train]".
    """
    try:
        from speccompile.train.options import DEFAULT_OUT, TrainOptions
        from speccompile.train.pipeline import run
    except ModuleNotFoundError as e:
        if e.name not in TRAIN_DEPENDENCIES:
            raise
        click.echo(f'error: training needs {e.name}, which is not installed: pip install "speccompile[train]"',
                   err=True)
        sys.exit(2)
    run(TrainOptions(**{**options, "out": options["out"] or DEFAULT_OUT}))


if __name__ == "__main__":
    main()
