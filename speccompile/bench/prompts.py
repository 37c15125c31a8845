"""The prompts a benchmark decodes: Spec-Bench questions by category, picked round-robin over the categories."""
from __future__ import annotations

import hashlib
import importlib.resources
import json

from speccompile.errors import SpeccompileError


def default_dataset() -> str:
    return str(importlib.resources.files("speccompile") / "data" / "bench_prompts.jsonl")


def _question(path: str, line_no: int, line: str) -> dict:
    where = f"{path}:{line_no}"
    try:
        q = json.loads(line)
    except json.JSONDecodeError as e:
        raise SpeccompileError(f"{where}: not JSON ({e})") from None
    turns = q.get("turns") if isinstance(q, dict) else None
    # a string's characters, a number or a list as a category would each pass a looser check and fail later
    if not isinstance(q, dict) or not isinstance(q.get("category"), str) or not isinstance(turns, list) \
            or not turns or not all(isinstance(t, str) for t in turns):
        raise SpeccompileError(f"{where}: not a Spec-Bench question (needs category: a name, turns: a list of "
                               "texts)")
    return {"question_id": q.get("question_id"), "category": q["category"], "text": turns[0], "turns": turns}


def read_questions(path: str) -> list[dict]:
    """Every question of a Spec-Bench jsonl file, in file order, as {question_id, category, text (the first turn),
    turns}; blank lines are skipped, anything else that is not a question is refused naming its line."""
    questions = []
    try:
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named, whatever the locale's encoding
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a byte-order mark is no JSON
                except UnicodeDecodeError as e:
                    raise SpeccompileError(f"{path}:{line_no}: not UTF-8 text ({e.reason})") from None
                if line.strip():
                    questions.append(_question(path, line_no, line))
    except OSError as e:
        raise SpeccompileError(f"cannot read dataset {path}: {e.strerror}") from None
    if not questions:
        raise SpeccompileError(f"{path}: no questions in it")
    return questions


def load_questions(path: str, categories: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """Spec-Bench questions by category, in file order (read_questions)."""
    by_category: dict[str, list[dict]] = {}
    for q in read_questions(path):
        if not categories or q["category"] in categories:
            by_category.setdefault(q["category"], []).append(q)
    missing = [c for c in categories if c not in by_category]
    if missing:
        raise SpeccompileError(f"no questions of category {', '.join(missing)} in {path}")
    return by_category


def pick_prompts(by_category: dict[str, list[dict]], limit: int | None, encode, max_prompt_tokens: int
                 ) -> tuple[list[dict], list]:
    """Round-robin over the categories, so that a few prompts still cover every category; a question whose prompt
    leaves no room for the answer in the compiled context is skipped. Returns (prompts with their ids, skipped
    question ids)."""
    if limit is not None and limit < 1:  # else "no prompt fits", as if the prompts were too long (the tools' --limit)
        raise SpeccompileError(f"--limit {limit}: must be at least 1")
    picked, skipped = [], []
    queues = [list(q) for q in by_category.values()]
    while any(queues) and (limit is None or len(picked) < limit):
        for queue in queues:
            while queue and (limit is None or len(picked) < limit):
                q = queue.pop(0)
                q["ids"] = encode(q["text"])
                if len(q["ids"]) <= max_prompt_tokens:
                    picked.append(q)
                    break
                skipped.append(q["question_id"])
    if not picked:
        raise SpeccompileError(f"no prompt fits the compiled context with room for {max_prompt_tokens} prompt tokens")
    return picked, skipped


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
