"""Stage gen: the target's own continuations of a prompt set (greedy, and a share sampled), with its chat template,
appended to WORK/gen.jsonl (a stopped run resumes where it stopped)."""
from __future__ import annotations

import json
import os
import random
import time

import torch

from speccompile.train.bundle_gen import BundleGenerator
from speccompile.train.options import TrainOptions
from speccompile.train.progress import log
from speccompile.train.prompts import read_prompts
from speccompile.train.target import load_target, load_tokenizer


def _done(out_path: str) -> tuple[set[int], int]:
    """Prompt indices already generated, and the tokens (prompt + response) they hold."""
    done, have = set(), 0
    if os.path.isfile(out_path):
        with open(out_path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done.add(r["idx"])
                    have += len(r["prompt_ids"]) + len(r["response_ids"])
    return done, have


def _encode(tok, prompts: list, todo: list[int]) -> dict[int, list[int]]:
    enc = {i: tok.apply_chat_template(prompts[i] if isinstance(prompts[i], list) else
                                      [{"role": "user", "content": prompts[i]}], tokenize=True,
                                      add_generation_prompt=True) for i in todo}
    return {i: (e["input_ids"] if isinstance(e, dict) or hasattr(e, "keys") else e) for i, e in enc.items()}


def _batches(todo: list[int], sampled: set[int], enc: dict, size: int, rng: random.Random) -> list[list[int]]:
    """A window of prompts in random order, sorted by length inside it (little padding); greedy and sampled prompts
    batch separately; the batches shuffled."""
    batches = []
    for kind in (False, True):
        ids = [i for i in todo if (i in sampled) == kind]
        for w in range(0, len(ids), size * 4):
            win = sorted(ids[w:w + size * 4], key=lambda i: len(enc[i]))
            batches += [win[j:j + size] for j in range(0, len(win), size)]
    rng.shuffle(batches)
    return batches


def _generate(model, eos: int, prompt_ids: list[list[int]], temp: float, max_new: int) -> list[list[int]]:
    """Each prompt's continuation, cut after its first eos."""
    L = max(map(len, prompt_ids))
    inp = torch.full((len(prompt_ids), L), eos, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), L), dtype=torch.long)
    for r, ids in enumerate(prompt_ids):  # left padding
        inp[r, L - len(ids):] = torch.tensor(ids)
        mask[r, L - len(ids):] = 1
    kw = dict(do_sample=True, temperature=temp, top_k=0, top_p=1.0) if temp > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=max_new, pad_token_id=eos,
                             eos_token_id=eos, **kw)
    news = []
    for r in range(len(prompt_ids)):
        new = out[r, L:].tolist()
        news.append(new[:new.index(eos) + 1] if eos in new else new)
    return news


def gen_description(a: TrainOptions) -> str:
    """What wrote the text, for the head's record."""
    if a.gen_bundle:
        name = os.path.basename(os.path.normpath(a.gen_bundle))
        return f"speccompile runtime on bundle {name}, batches of {a.gen_batch}"
    return f"transformers generate, {a.gen_dtype}, batches of {a.gen_batch}"


def stage_gen(a: TrainOptions, hf_dir: str, out_path: str) -> float:
    """Generate until the prompts, --gen-minutes or --gen-tokens run out; the seconds it took."""
    # bfloat16 generates faster on CPUs with avx512_bf16; only the text comes from it (the labels and features are
    # the float32 target's, teacher-forced), so the data stays the target's own distillation
    bundle = BundleGenerator(a.gen_bundle, a.threads) if a.gen_bundle else None
    tok, model = (load_tokenizer(hf_dir), None) if bundle else load_target(hf_dir, a.gen_dtype)
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    prompts = read_prompts(a.prompts, a.num_prompts, a.seed)
    rng = random.Random(a.seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    sampled = {i for i in order if rng.random() < a.sample_frac}
    done, have = _done(out_path)
    todo = [i for i in order if i not in done]
    enc = _encode(tok, prompts, todo)
    if bundle:
        todo = [i for i in todo if bundle.fits(enc[i])]
    batches = _batches(todo, sampled, enc, a.gen_batch, rng)
    t0, total_new = time.time(), 0
    log(f"gen: {len(todo)} prompts to go ({len(done)} done), {len(batches)} batches of <= {a.gen_batch}, "
        f"budget {a.gen_minutes} min")
    with open(out_path, "a") as f:
        for bi, batch in enumerate(batches):
            if time.time() - t0 > a.gen_minutes * 60:
                log("gen: time budget spent")
                break
            if a.gen_tokens and have >= a.gen_tokens:
                log(f"gen: {have} tokens (prompt + response), the --gen-tokens target")
                break
            temp = a.temperature if batch[0] in sampled else 0.0
            torch.manual_seed(a.seed + bi)
            prompt_ids = [enc[i] for i in batch]
            news = (bundle(prompt_ids, temp, a.max_new_tokens, a.seed + bi * a.gen_batch) if bundle else
                    _generate(model, eos, prompt_ids, temp, a.max_new_tokens))
            for i, new in zip(batch, news):
                total_new += len(new)
                have += len(enc[i]) + len(new)
                f.write(json.dumps({"idx": i, "prompt": prompts[i], "temperature": temp,
                                    "prompt_ids": list(enc[i]), "response_ids": new}) + "\n")
            f.flush()
            el = time.time() - t0
            log(f"gen: batch {bi + 1}/{len(batches)}  {total_new} new tokens ({have} in all)  "
                f"{total_new / el:.1f} tok/s  {el / 60:.1f} min")
    return time.time() - t0
