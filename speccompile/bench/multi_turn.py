"""`speccompile bench --multi-turn`: chats with a long first message, each decoded with the context cache and
without it, reporting per turn the time to first token (TTFT) both ways and how much of the prompt the cache gave
back (prompt_cache_hit_tokens over the prompt's tokens).

Each conversation starts from an empty cache, so its first turn is a miss and later turns can hit only the chat's
own history. The two runs of a conversation alternate which goes first. Each turn's prompt is the conversation so
far through the chat template (the answers re-encoded from their text, as a chat client sends them): the user's
message, the model's answer, the next message. Greedy, so both runs answer alike (reported: `identical`).
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Callable

from speccompile import load
from speccompile.bench.prompts import default_dataset, read_questions
from speccompile.errors import SpeccompileError

LONG_CATEGORIES = ("summarization", "rag", "extraction")  # Spec-Bench categories with long first messages
FOLLOW_UP_TOKENS = 48  # a follow-up message through the chat template, at most (room kept per turn)
FOLLOW_UPS = ("Now summarize your answer in one sentence.",
              "Which point matters most, and why?",
              "Give one example that illustrates it.")


@dataclasses.dataclass
class MultiTurnSettings:
    dataset: str | None = None
    categories: tuple[str, ...] = ()  # empty: LONG_CATEGORIES
    limit: int | None = None  # conversations (default 3)
    turns: int = 3
    max_new_tokens: int = 64
    drafter: str | None = None  # None: the bundle's first
    threads: int | None = None


def conversations(path: str, categories: tuple[str, ...], limit: int, turns: int, fits: Callable[[list[str]], bool]
                  ) -> list[list[str]]:
    """The user messages of `limit` conversations: the longest first turns of those categories whose whole
    conversation fits, each followed by the question's own later turns, then FOLLOW_UPS."""
    found = [(q["turns"] + list(FOLLOW_UPS))[:turns] for q in read_questions(path) if q["category"] in categories]
    found = [c for c in sorted(found, key=lambda c: -len(c[0])) if fits(c)][:limit]
    if not found:
        raise SpeccompileError(f"no question of categories {', '.join(categories)} in {path} fits the context")
    return found


def run_chat(gen, messages_in: list[str], max_new_tokens: int, drafter: str | None) -> list[dict]:
    messages, turns = [], []
    for text in messages_in:
        messages.append({"role": "user", "content": text})
        res = gen.chat(messages, max_new_tokens, drafter=drafter)
        s = res.stats
        turns.append({"ttft_s": s["ttft_s"], "total_s": s["total_s"], "prompt_tokens": s["prompt_tokens"],
                      "hit_tokens": s["prompt_cache_hit_tokens"], "miss_tokens": s["prompt_cache_miss_tokens"],
                      "token_ids": res.token_ids})
        messages.append({"role": "assistant", "content": res.text})
    return turns


def last_prompt_tokens(gen, chat: list[str]) -> int:
    """The tokens of the conversation's last prompt without its answers: every message through the chat template,
    each earlier answer left empty (the answers are counted at max_new_tokens apart)."""
    messages = []
    for text in chat:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
    return len(gen.tokenizer.encode_messages(messages[:-1]))


def run_multi_turn(bundle: str, settings: MultiTurnSettings, log: Callable[[str], None] = print) -> dict:
    if settings.limit is not None and settings.limit < 1:
        raise SpeccompileError(f"--limit {settings.limit}: must be at least 1")
    if settings.max_new_tokens < 1:  # else no conversation "fits the context", or the first turn fails after loading
        raise SpeccompileError(f"--max-new-tokens {settings.max_new_tokens}: must be at least 1")
    gen = load(bundle, threads=settings.threads)
    cache = gen.context_cache
    def fits(chat: list[str]) -> bool:
        """Room for every answer and a short follow-up (a template's worth of tokens) after the first message, and
        for the last turn's prompt with the conversation's own later messages, however long (a question's second
        turn may be longer than a follow-up: its turn would fail half-way through the run)."""
        room = gen.max_seq_len - settings.turns * (settings.max_new_tokens + FOLLOW_UP_TOKENS)
        return (len(gen.encode_chat(chat[0])) <= room
                and last_prompt_tokens(gen, chat) + len(chat) * settings.max_new_tokens <= gen.max_seq_len)

    chats = conversations(settings.dataset or default_dataset(), settings.categories or LONG_CATEGORIES,
                          settings.limit or 3, settings.turns, fits)
    # warm-up: the first long prefill grows onnxruntime's arenas and pages the weights in; then an empty cache
    gen.chat([{"role": "user", "content": chats[0][0]}], 8, drafter=settings.drafter)
    cache.clear()
    runs = []
    for i, chat in enumerate(chats):
        pair = {}
        for cached in ((True, False) if i % 2 == 0 else (False, True)):
            gen.context_cache = cache if cached else None
            cache.clear()
            pair["cache" if cached else "no_cache"] = run_chat(gen, chat, settings.max_new_tokens, settings.drafter)
        gen.context_cache = cache
        runs.append(pair)
        log(f"conversation {i + 1}/{len(chats)}: first message {pair['cache'][0]['prompt_tokens']} tokens")
    return {"mode": "multi-turn", "bundle": bundle, "settings": dataclasses.asdict(settings),
            "turns": summarize(runs), "conversations": runs}


def summarize(runs: list[dict]) -> list[dict]:
    """Per turn: median TTFT with and without the cache, the median of each conversation's own TTFT ratio, the
    share of prompt tokens the cache gave back, and whether both runs answered alike."""
    out = []
    for t in range(min(len(r["cache"]) for r in runs)):
        on, off = [r["cache"][t] for r in runs], [r["no_cache"][t] for r in runs]
        out.append({"turn": t + 1, "prompt_tokens": statistics.median(x["prompt_tokens"] for x in on),
                    "ttft_cache_s": statistics.median(x["ttft_s"] for x in on),
                    "ttft_no_cache_s": statistics.median(x["ttft_s"] for x in off),
                    "ttft_speedup": statistics.median(b["ttft_s"] / a["ttft_s"] for a, b in zip(on, off)),
                    "hit_tokens": sum(x["hit_tokens"] for x in on),
                    "miss_tokens": sum(x["miss_tokens"] for x in on),
                    "hit_rate": sum(x["hit_tokens"] for x in on) / sum(x["prompt_tokens"] for x in on),
                    "identical": all(a["token_ids"] == b["token_ids"] for a, b in zip(on, off))})
    return out


def format_multi_turn(result: dict) -> str:
    head = (f"{'turn':>4} {'prompt':>7} {'hit rate':>8} {'hit/miss tokens':>16} {'TTFT cache':>11} "
            f"{'TTFT none':>10} {'speedup':>8}  identical")
    rows = [head] + [f"{r['turn']:>4} {r['prompt_tokens']:>7.0f} {r['hit_rate']:>8.1%} "
                     f"{str(r['hit_tokens']) + '/' + str(r['miss_tokens']):>16} {r['ttft_cache_s'] * 1e3:>9.1f}ms "
                     f"{r['ttft_no_cache_s'] * 1e3:>8.1f}ms {r['ttft_speedup']:>7.2f}x  {r['identical']}"
                     for r in result["turns"]]
    return "\n".join(rows)
