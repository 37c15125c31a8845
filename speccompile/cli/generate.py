"""`speccompile generate`: decode a prompt from a bundle, streaming the text."""
from __future__ import annotations

import functools
import json
import random

import click

from speccompile.cli.common import context_cache_options, device_options, runtime_device
from speccompile.cli.errors import errors_to_exit
from speccompile.cli.generate_options import STOP_HELP, check_generate_options, unescape_stop
from speccompile.errors import SpeccompileError


@click.command()
@click.argument("bundle", type=click.Path())
@click.argument("prompt")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, help="With --temperature: sample from the k likeliest tokens.")
@click.option("--top-p", default=1.0, show_default=True,
              help="With --temperature: sample from the likeliest tokens whose probabilities sum to p.")
@click.option("--min-p", default=0.0, show_default=True,
              help="With --temperature: sample from the tokens at least p times as likely as the likeliest.")
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
@click.option("--ignore-eos", is_flag=True,
              help="Go on past end-of-sequence tokens to --max-new-tokens (a --stop string still stops).")
@click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads (default: all cores).")
@device_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--logprobs", default=None, type=int,
              help="With --json: each token's log-probability under the target and the K likeliest tokens' (0-20).")
@click.option("--prompt-logprobs", default=None, type=int,
              help="With --json: the same for each prompt token after the first (runs the whole prompt).")
@context_cache_options
@errors_to_exit
def generate(bundle, prompt, max_new_tokens, temperature, top_k, top_p, min_p, seed, drafter, num_draft, tree,
             acceptance, recalibrate, no_speculate, compare, no_chat, system, stop, ignore_eos, threads, device,
             backend, as_json, logprobs, prompt_logprobs, no_context_cache, cache_bytes, cache_dir):
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
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                  stop=tuple(map(unescape_stop, stop)), ignore_eos=ignore_eos, logprobs=logprobs,
                  prompt_logprobs=prompt_logprobs, chat=not no_chat, drafter=drafter, num_draft=num_draft, tree=tree,
                  acceptance=acceptance)
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
        for field, entries in (("logprobs", res.logprobs), ("prompt_logprobs", res.prompt_logprobs)):
            if entries is not None:  # a prompt's first token: null
                out[field] = [e and {"token": e.token, "logprob": e.logprob, "top": e.top} for e in entries]
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
    typical acceptance's and plain sampling's, may differ in length). Where neither run kept a token (a stop string
    at the answer's start), the plain run's time over the speculative run's: both decoded up to the stop, and
    their rates, 0 and 0, tell nothing."""
    if not spec["new_tokens"] and not plain["new_tokens"]:
        return plain["total_s"] / spec["total_s"] if spec["total_s"] > 0 else 0.0
    return spec["tokens_per_second"] / plain["tokens_per_second"] if plain["tokens_per_second"] else 0.0
