"""The prompt sets a draft head is self-distilled on: hand-written instructions (templates x topics, code tasks,
passages to summarize or rewrite, translations, emails, general and factual questions, math word problems with
generated numbers), follow-up turns over the model's own answers, and Magpie user turns sampled from the target.
Written for this purpose only: nothing comes from a benchmark. The pools live in data/prompt_pools.json.

    python -m speccompile.train.prompts --n 600 --out /tmp/head_prompts.jsonl
    python -m speccompile.train.prompts --mix reading --n 640 --seed 21 --out /tmp/reading.jsonl
    python -m speccompile.train.prompts --second-round WORK/gen.jsonl --tokenizer HF/tokenizer.json --n 800 --out R2
    python -m speccompile.train.prompts --magpie HF_DIR --n 1600 --out /tmp/magpie.jsonl [--bundle BUNDLE]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import time
from importlib import resources

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from speccompile.errors import SpeccompileError
from speccompile.train.bundle_gen import BundleGenerator
from speccompile.train.gen import gen_records

# share of each kind of task in make_prompts' output
KIND_WEIGHTS = {"topic": 0.40, "code": 0.15, "math": 0.13, "passage": 0.08, "translate": 0.06, "email": 0.06,
                "general": 0.12}
MATH_PROMPTS = 300
MAGPIE_TRIES_PER_PROMPT = 20  # a model that seldom ends a user turn gives up, not loops forever


@functools.cache
def pools() -> dict[str, list]:
    """The hand-written pools, by name (lower-case): lists of strings, or of [language, sentence] pairs."""
    return json.loads(resources.files("speccompile.train").joinpath("data/prompt_pools.json").read_text("utf-8"))


def _math(rng: random.Random) -> str:
    """A math word problem with numbers drawn from rng."""
    p = pools()
    n, m = rng.choice(p["names"]), rng.choice(p["names"])
    item, _ = rng.choice(p["items"])
    a, b, c = rng.randint(5, 60), rng.randint(2, 20), rng.randint(2, 9)
    return rng.choice(p["math_forms"]).format(n=n, m=m, item=item, a=a, b=b, c=c, a_times_5=a * 5, b_times_5=b * 5,
                                              a_times_10=a * 10, c_times_2=c * 2, c_times_a_plus_b=c * a + b,
                                              b_times_3=b * 3)


def _prompts_by_kind(rng: random.Random) -> dict[str, list[str]]:
    """Every prompt the pools make, by kind, each kind shuffled."""
    p, made = pools(), []
    for tmpl in p["templates"]:
        for t in p["topics"]:
            u = rng.choice([x for x in p["topics"] if x != t])
            made.append(("topic", tmpl.format(t=t, a=rng.choice(p["audiences"]), u=u)))
    for lang in p["langs"]:
        for c in p["code_tasks"]:
            made.append(("code", rng.choice(p["code_templates"]).format(l=lang, c=c)))
    made += [("code", tmpl.format(s=s)) for s in p["code_snippets"] for tmpl in p["code_snippet_templates"]]
    made += [("passage", tmpl.format(p=x)) for x in p["passages"] for tmpl in p["passage_templates"]]
    made += [("translate", f"Translate into {lang}: \"{s}\"") for s in p["sentences"] for lang in p["languages"]]
    made += [("translate", tmpl.format(l=lang, s=sent)) for lang, sent in p["foreign"]
             for tmpl in p["foreign_templates"]]
    made += [("email", e) for e in p["emails"]] + [("general", g) for g in p["general"] + p["questions"]]
    made += [("math", _math(rng)) for _ in range(MATH_PROMPTS)]
    by_kind: dict[str, list[str]] = {}
    for kind, prompt in made:
        by_kind.setdefault(kind, []).append(prompt)
    for v in by_kind.values():
        rng.shuffle(v)
    return by_kind


def make_prompts(n: int = 600, seed: int = 0) -> list[str]:
    """`n` distinct prompts, deterministic for a seed, mixed over all task kinds."""
    rng = random.Random(seed)
    by_kind = _prompts_by_kind(rng)
    out, seen = [], set()
    order = list(KIND_WEIGHTS)
    while len(out) < n:
        kind = rng.choices(order, [KIND_WEIGHTS[k] for k in order])[0]
        if not by_kind[kind]:
            if all(not by_kind[k] for k in order):
                break
            continue
        p = by_kind[kind].pop()
        if kind in ("topic", "general"):
            p += rng.choice(pools()["style_suffix"])
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


# share of each kind in reading_prompts' output: the reading, translation and essay tasks the first mix
# under-represents, with the first mix itself kept so a warm-started head does not forget it
READING_WEIGHTS = {"translate": 0.22, "reading": 0.22, "rag": 0.10, "stem": 0.14, "humanities": 0.14, "mix": 0.18}


def _reading_kinds(rng: random.Random) -> dict[str, list[str]]:
    """Every prompt of the reading mix, by kind, each kind shuffled."""
    p = pools()
    arts = p["articles"]
    made = {"translate": [t.format(l=lang, s=s) for lang, s in p["news_foreign"] for t in p["translate_templates"]],
            "reading": [t.format(p=a["text"], q=q) for a in arts for q in a["questions"]
                        for t in p["reading_templates"]],
            "rag": [], "stem": [], "humanities": []}
    for i, a in enumerate(arts):
        for q in a["questions"]:
            others = rng.sample([x["text"] for j, x in enumerate(arts) if j != i], 2)
            docs = [a["text"]] + others
            rng.shuffle(docs)
            made["rag"] += [t.format(p1=docs[0], p2=docs[1], p3=docs[2], q=q) for t in p["rag_templates"]]
    for kind in ("stem", "humanities"):
        topics = p[f"{kind}_topics"]
        for t in topics:
            for tmpl in p[f"{kind}_templates"]:
                made[kind].append(tmpl.format(t=t, u=rng.choice([x for x in topics if x != t])))
    for v in made.values():
        rng.shuffle(v)
    return made


def reading_prompts(n: int = 600, seed: int = 0) -> list[str]:
    """`n` distinct prompts of the reading mix (READING_WEIGHTS), deterministic for a seed; its "mix" share is
    make_prompts' first mix under another seed."""
    rng = random.Random(seed)
    by_kind = _reading_kinds(rng)
    by_kind["mix"] = make_prompts(n, seed + 1)
    order = list(READING_WEIGHTS)
    counts = {k: round(n * w) for k, w in READING_WEIGHTS.items()}
    out: list[str] = []
    for k in order:
        out += list(dict.fromkeys(by_kind[k]))[:counts[k]]
    rng.shuffle(out)
    return list(dict.fromkeys(out))[:n]


def read_prompts(path: str | None, n: int, seed: int) -> list:
    """A prompt file's items (read_prompt_file), the first n (0: all); without a file, make_prompts(n or 600,
    seed)."""
    if not path:
        return make_prompts(n or 600, seed)
    out = read_prompt_file(path)
    return out[:n] if n else out


def read_prompt_file(path: str) -> list:
    """Per non-blank line of a UTF-8 file: a JSON object (a line that starts with "{"), {"prompt": text} or
    {"messages": [chat turns]}, else the line itself as a plain-text prompt. Checked whole before any stage runs:
    a line that is neither, or a file with no prompt, is one error naming it."""
    out = []
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark, as Windows editors write, is no text
            for number, line in enumerate(f, 1):
                if line.strip():
                    out.append(_prompt_item(line.strip(), f"--prompts {path}, line {number}"))
    except UnicodeDecodeError as e:
        raise SpeccompileError(f"--prompts {path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
    if not out:
        raise SpeccompileError(f"--prompts {path}: no prompts (the file has no non-blank line)")
    return out


PROMPT_LINE = 'a JSON line is {"prompt": "text"} or {"messages": [{"role": "user", "content": "text"}, ...]}'


def _prompt_item(line: str, where: str):
    """One line's prompt: its text, or a chat's list of turns."""
    if not line.startswith("{"):
        return line
    try:
        r = json.loads(line)
    except ValueError as e:
        raise SpeccompileError(f"{where}: starts with '{{' but is not valid JSON ({e}); {PROMPT_LINE}, any other "
                               "line a plain-text prompt") from None
    turns = r.get("messages") if isinstance(r, dict) else None
    if isinstance(turns, list) and turns and all(isinstance(t, dict) and isinstance(t.get("role"), str)
                                                 and isinstance(t.get("content"), str) for t in turns):
        return turns
    if isinstance(r, dict) and "messages" not in r and isinstance(r.get("prompt"), str) and r["prompt"].strip():
        return r["prompt"]
    raise SpeccompileError(f"{where}: {PROMPT_LINE}")


def second_round(gen_path: str, tokenizer_json: str, n: int, seed: int = 0) -> list:
    """Prompts that build on a first round's generations (a work dir's gen.jsonl): a second user turn after the
    model's own answer (multi-turn chat), and summaries / questions over its longer answers (the long-context
    reading tasks). Items are message lists ({"messages": [...]}) or strings."""
    rng = random.Random(seed)
    try:
        tok = Tokenizer.from_file(tokenizer_json)
    except Exception as e:  # tokenizers raises its load errors as plain Exception
        raise SpeccompileError(f"--tokenizer {tokenizer_json}: not a readable tokenizer.json ({e})") from None
    recs = []
    for r in gen_records(gen_path):  # a line cut off by a stopped gen run left out
        if isinstance(r["prompt"], str):
            r["text"] = tok.decode(r["response_ids"], skip_special_tokens=True)
            # whole answers of some length, not degenerate repetitions
            if len(r["text"]) > 200 and len(set(r["response_ids"])) > len(r["response_ids"]) // 3:
                recs.append(r)
    rng.shuffle(recs)
    out = []
    for i, r in enumerate(recs):
        if len(out) >= n:
            break
        if i % 2 == 0:
            out.append({"messages": [{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": r["text"].strip()},
                                     {"role": "user", "content": rng.choice(pools()["follow_ups"])}]})
        else:
            out.append(rng.choice(pools()["over_text"]).format(p=r["text"].strip()))
    return out


def _turn_end(tok) -> int:
    """The token that ends a chat turn."""
    return tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id


def _user_turns(tok, sample, system: str | None, batch: int, max_tokens: int, seed: int) -> list[str]:
    """A batch of user turns the model writes when its chat template stops at the start of a user turn (only
    whole turns: those that ended before max_tokens). sample(ids, batch, max_tokens, seed): token rows."""
    end = _turn_end(tok)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "\x00"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    ids = tok(text[:text.index("\x00")], add_special_tokens=False).input_ids
    rows = sample(ids, batch, max_tokens, seed)
    return [tok.decode(row[:row.index(end)], skip_special_tokens=True).strip() if end in row else None
            for row in rows]


def _transformers_sampler(model, end: int):
    """sample() for _user_turns by transformers' generate at temperature 1."""
    def sample(ids: list[int], batch: int, max_tokens: int, seed: int) -> list[list[int]]:
        inp = torch.tensor([ids] * batch)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), do_sample=True, temperature=1.0,
                                 top_p=1.0, top_k=0, max_new_tokens=max_tokens, eos_token_id=end, pad_token_id=end)
        return out[:, len(ids):].tolist()
    return sample


def _bundle_sampler(bundle_dir: str, threads: int):
    """sample() for _user_turns by a compiled bundle of the target at temperature 1 (each row its own seed)."""
    gen = BundleGenerator(bundle_dir, threads)
    return lambda ids, batch, max_tokens, seed: gen([ids] * batch, 1.0, max_tokens, seed)


def _kept_turns(out_path: str) -> set[str]:
    """The user turns an earlier run kept in out_path (the first 80 characters, lower-case). A last line without
    its newline that is no whole record was cut off when that run stopped (a kill, a full disk): cut from the
    file, so that appending continues whole lines (a whole one gets its newline)."""
    if not os.path.isfile(out_path):
        return set()
    with open(out_path, "rb+") as f:
        lines = f.read().split(b"\n")
        if _magpie_turn(lines[-1]) is None:
            f.truncate(f.tell() - len(lines[-1]))
            lines[-1] = b""
        elif lines[-1]:
            f.write(b"\n")
    seen = set()
    for number, line in enumerate(lines, 1):
        prompt = _magpie_turn(line) if line.strip() else ""
        if prompt is None:
            raise SpeccompileError(f"--out {out_path}, line {number}: not a user turn an earlier --magpie run "
                                   "wrote; name another --out")
        if prompt:
            seen.add(prompt.lower()[:80])
    return seen


def _magpie_turn(line: bytes) -> str | None:
    """The user turn of a line magpie wrote, else None."""
    try:
        prompt = json.loads(line)["prompt"]
    except (ValueError, TypeError, KeyError):
        return None
    return prompt if isinstance(prompt, str) else None


def magpie(hf_dir: str, n: int, out_path: str, seed: int = 0, batch: int = 48, max_tokens: int = 160,
           dtype: str = "bfloat16", log=print, bundle: str | None = None, threads: int = 2) -> int:
    """Magpie (Xu et al., 2024): sample n user turns from an instruction-tuned target given its chat template up
    to the start of a user turn -- prompts from its own instruction distribution, far more varied than templates,
    with no corpus. Most use the default system prompt; some steer toward the reading, coding and math tasks short
    samples under-represent. Sampled by transformers, or by a compiled bundle of the target if given. Appends to
    out_path, so a stopped run resumes; gives up after MAGPIE_TRIES_PER_PROMPT samples a prompt wanted."""
    seen = _kept_turns(out_path)  # a file it cannot append to is refused before the target loads
    tok = AutoTokenizer.from_pretrained(hf_dir)
    if bundle:
        sample = _bundle_sampler(bundle, threads)
    else:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
        sample = _transformers_sampler(model, _turn_end(tok))
    rng = random.Random(seed + len(seen))
    t0, kept, tried = time.time(), len(seen), 0
    with open(out_path, "a") as f:
        while kept < n and tried < MAGPIE_TRIES_PER_PROMPT * n:
            system = rng.choice(pools()["magpie_systems"])
            for p in _user_turns(tok, sample, system, batch, max_tokens, rng.randrange(1 << 30)):
                tried += 1
                if p is None or len(p.split()) < 4 or p.lower()[:80] in seen or "<|" in p:
                    continue
                seen.add(p.lower()[:80])
                kept += 1
                f.write(json.dumps({"prompt": p, "source": "magpie", "system": system}) + "\n")
            f.flush()
            log(f"magpie: {kept}/{n} prompts kept of {tried} sampled  {(time.time() - t0) / 60:.1f} min")
    return kept


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="-")
    ap.add_argument("--second-round", metavar="GEN_JSONL", help="build on a first round's generations instead")
    ap.add_argument("--tokenizer", help="the target's tokenizer.json (with --second-round)")
    ap.add_argument("--magpie", metavar="HF_DIR", help="sample user turns from this instruction-tuned target "
                    "(appends to --out; resumable)")
    ap.add_argument("--batch", type=int, default=48, help="with --magpie")
    ap.add_argument("--bundle", help="with --magpie: sample with this compiled bundle of the target (faster on CPU)")
    ap.add_argument("--threads", type=int, default=2, help="with --magpie --bundle")
    ap.add_argument("--mix", choices=["first", "reading"], default="first",
                    help="first: make_prompts; reading: reading_prompts (translation, reading, RAG, essays)")
    a = ap.parse_args(argv)
    if a.magpie and a.out == "-":
        ap.error("--magpie writes to a file: give --out")
    if a.second_round and not a.tokenizer:
        ap.error("--second-round needs --tokenizer (the target's tokenizer.json)")
    try:
        write_prompts(a)
    except (SpeccompileError, OSError, ValueError) as e:  # bad input: one line, as the speccompile command says it
        reason = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror and e.filename else e
        print(f"error: {' '.join(str(reason).split())}", file=sys.stderr)
        sys.exit(2)


def write_prompts(a: argparse.Namespace) -> None:
    """The prompts main's arguments ask for, to --out (or stdout)."""
    if a.magpie:
        magpie(a.magpie, a.n, a.out, a.seed, a.batch, log=lambda m: print(m, file=sys.stderr, flush=True),
               bundle=a.bundle, threads=a.threads)
        return
    items = (second_round(a.second_round, a.tokenizer, a.n, a.seed) if a.second_round else
             reading_prompts(a.n, a.seed) if a.mix == "reading" else make_prompts(a.n, a.seed))
    lines = "".join(json.dumps(p if isinstance(p, dict) else {"prompt": p}) + "\n" for p in items)
    if a.out == "-":
        print(lines, end="")
    else:
        with open(a.out, "w") as f:
            f.write(lines)


if __name__ == "__main__":
    main()
