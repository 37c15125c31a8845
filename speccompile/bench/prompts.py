"""The prompts a benchmark decodes: Spec-Bench questions by category, picked round-robin over the categories."""
from __future__ import annotations

import hashlib
import importlib.resources
import json

from speccompile.errors import SpeccompileError


def default_dataset() -> str:
    return str(importlib.resources.files("speccompile") / "data" / "bench_prompts.jsonl")


def _question(path: str, line_no: int, line: str) -> dict:
    q = json.loads(line)
    if not isinstance(q, dict) or not isinstance(q.get("turns"), list) or not q["turns"] or "category" not in q:
        raise SpeccompileError(f"{path}:{line_no}: not a Spec-Bench question (needs category, turns)")
    return {"question_id": q.get("question_id"), "category": q["category"], "text": q["turns"][0]}


def load_questions(path: str, categories: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """Spec-Bench questions by category, in file order, each as {question_id, category, text (first turn)}."""
    by_category: dict[str, list[dict]] = {}
    try:
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                q = _question(path, line_no, line)
                if not categories or q["category"] in categories:
                    by_category.setdefault(q["category"], []).append(q)
    except OSError as e:
        raise SpeccompileError(f"cannot read dataset {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SpeccompileError(f"{path}: not JSON lines ({e})") from None
    missing = [c for c in categories if c not in by_category]
    if missing:
        raise SpeccompileError(f"no questions of category {', '.join(missing)} in {path}")
    return by_category


def pick_prompts(by_category: dict[str, list[dict]], limit: int | None, encode, max_prompt_tokens: int
                 ) -> tuple[list[dict], list]:
    """Round-robin over the categories, so that a few prompts still cover every category; a question whose prompt
    leaves no room for the answer in the compiled context is skipped. Returns (prompts with their ids, skipped
    question ids)."""
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
