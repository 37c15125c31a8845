"""Stage gen: the target's own continuations of a prompt set (greedy, and a share sampled), with its chat template,
appended to WORK/gen.jsonl (a stopped run resumes where it stopped)."""
from __future__ import annotations

import json
import os
import random
import time

import torch

from speccompile.errors import SpeccompileError
from speccompile.train.bundle_gen import BundleGenerator
from speccompile.train.options import TrainOptions
from speccompile.train.progress import log
from speccompile.train.target import load_target, load_tokenizer, target_config


GEN_FIELDS = {"idx", "prompt", "temperature", "prompt_ids", "response_ids"}  # what a gen.jsonl line holds


def gen_records(path: str) -> list[dict]:
    """The sequences of a gen.jsonl in file order. A last line without its newline is one a run was stopped (Ctrl-C,
    a kill) while writing: left out, and cut off before gen appends (drop_cut_line). Any other line that is not a
    record is an error naming it."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")[:-1]  # the piece after the last newline: empty, or a cut-off line
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                r = json.loads(line)
            except ValueError:
                r = None
            if not isinstance(r, dict) or not GEN_FIELDS <= set(r):
                raise SpeccompileError(f"{path}, line {number}: not a record of the gen stage; remove the line, or "
                                       "run --redo gen")
            records.append(r)
    return records


def drop_cut_line(path: str) -> None:
    """Cut a gen.jsonl back to its last whole line, so that appending continues it (the cut sequence is generated
    again)."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):
            log(f"gen: {path} ends in a line cut off when a run stopped: dropped, its prompt generated again")
            f.truncate(whole)


def _check_same_prompts(path: str, records: list[dict], prompts: list) -> None:
    """A record's idx is its prompt's place in this run's prompt set: a gen.jsonl of another set (another --prompts
    file or --seed, in the same --work) would have this run skip its prompts at those places as done."""
    for r in records:
        if r["idx"] < len(prompts) and r["prompt"] != prompts[r["idx"]]:
            raise SpeccompileError(f"{path} holds the answers to other prompts (prompt {r['idx']} was "
                                   f"{str(r['prompt'])[:60]!r}, is {str(prompts[r['idx']])[:60]!r}): give these "
                                   "prompts another --work (--extra-features trains on both), or --redo gen")


def _done(out_path: str, prompts: list) -> tuple[set[int], int]:
    """Prompt indices already generated, and the tokens (prompt + response) they hold."""
    records = gen_records(out_path) if os.path.isfile(out_path) else []
    _check_same_prompts(out_path, records, prompts)
    return {r["idx"] for r in records}, sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in records)


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


def check_gen_bundle(path: str, manifest: dict, target: dict) -> None:
    """--gen-bundle is a bundle of the target: one of another model would write another model's text, its token ids
    perhaps past the target's vocabulary."""
    theirs = manifest["models"]["target"]["config"]
    differ = [f"{k} {theirs.get(k)}, the target's {target.get(k)}" for k in ("vocab_size", "hidden_size",
              "num_hidden_layers") if theirs.get(k) != target.get(k)]
    if differ:
        raise SpeccompileError(f"--gen-bundle {path}: a bundle of another model than --target ({'; '.join(differ)})")


def stage_gen(a: TrainOptions, hf_dir: str, out_path: str, prompts: list) -> tuple[float, int]:
    """Generate until the prompts, --gen-minutes or --gen-tokens run out; (the seconds it took, the sequences it
    wrote)."""
    # bfloat16 generates faster on CPUs with avx512_bf16; only the text comes from it (the labels and features are
    # the float32 target's, teacher-forced), so the data stays the target's own distillation
    bundle = BundleGenerator(a.gen_bundle, a.threads) if a.gen_bundle else None
    if bundle:
        check_gen_bundle(a.gen_bundle, bundle.gen.manifest, target_config(hf_dir))
    tok, model = (load_tokenizer(hf_dir), None) if bundle else load_target(hf_dir, a.gen_dtype)
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    rng = random.Random(a.seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    sampled = {i for i in order if rng.random() < a.sample_frac}
    drop_cut_line(out_path)
    done, have = _done(out_path, prompts)
    todo = [i for i in order if i not in done]
    enc = _encode(tok, prompts, todo)
    if bundle:
        todo = [i for i in todo if bundle.fits(enc[i])]
    batches = _batches(todo, sampled, enc, a.gen_batch, rng)
    t0, total_new, written = time.time(), 0, 0
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
            written += len(batch)
            el = time.time() - t0
            log(f"gen: batch {bi + 1}/{len(batches)}  {total_new} new tokens ({have} in all)  "
                f"{total_new / el:.1f} tok/s  {el / 60:.1f} min")
    return time.time() - t0, written
