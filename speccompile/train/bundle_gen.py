"""A compiled bundle of the target as the writer of training text: the runtime's own decoding, for the gen stage's
answers and Magpie's user turns (both far faster on CPU than transformers' generate)."""
from __future__ import annotations


class BundleGenerator:
    """The target's continuations from a compiled bundle: the runtime's own decoding, speculative and lossless,
    a batch's streams sharing passes; each continuation capped by the room the bundle's context leaves."""

    def __init__(self, bundle_dir: str, threads: int):
        import speccompile  # the runtime, loaded only when a bundle writes
        self.gen = speccompile.load(bundle_dir, threads=threads, context_cache=False)
        self.room = self.gen.max_seq_len

    def fits(self, ids: list[int]) -> bool:
        return len(ids) + 16 <= self.room

    def __call__(self, prompt_ids: list[list[int]], temp: float, max_new: int, seed: int) -> list[list[int]]:
        from speccompile.runtime.generator import drain
        streams = [self.gen.stream(list(ids), min(max_new, self.room - len(ids)), temperature=temp,
                                   seed=seed + r) for r, ids in enumerate(prompt_ids)]
        return [drain(s).token_ids for s in streams]
