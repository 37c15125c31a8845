"""Which drafts a pass shared by several sequence slots verifies (runtime/scheduler.py runs the passes).

A request alone drafts as the Generator's own loop does. Sharing a pass, a greedy slot's output does not depend on
its drafts (nor does that of one sampled by noise with exact acceptance: Slot.fixed_output), so they are cut to what
pays beside the other slots' rows; any other slot drafts as it would alone, so that its seed's draws (or, under
typical acceptance, the drafts it keeps) do not depend on what else runs.
"""
from __future__ import annotations

from speccompile.runtime.drafters.base import Proposal
from speccompile.runtime.slots import Slot

# Rows a shared verify pass aims at: a pass's cost grows with its rows, so when several greedy slots decode, their
# drafts share this budget (each keeps at least one draft node). Over a target whose products round activations to
# int8 (graphs.trees_exact false: the 4-bit builds) every row pays the int8 kernel's compute, and the slots' own
# rows already fill the pass: greedy slots then decode plainly while others run, but for the prompt-lookup rows
# below (docs/results.md, "Concurrent streams"). Greedy output does not depend on the drafts; sampled requests
# keep their whole drafts, so a seed's draws do not depend on what else runs.
SHARED_PASS_ROWS = 16
# Over such a target a shared pass's products run its real rows alone (the batched graph's packed rows), and a row
# past one per slot costs about what the token it may add is worth: at most this many greedy slots verify one
# prompt-lookup node each, those whose match this request has found taken most often, and only above
# SHARED_LOOKUP_MIN (docs/results.md, "Concurrent streams"; more slots or longer chains measured no faster).
SHARED_LOOKUP_SLOTS = 2
SHARED_LOOKUP_MIN = 0.5


def propose_shared(gen, slots: list[Slot], inside: int, catch_up=None) -> None:
    """Each slot's drafts. A greedy slot's output does not depend on them: they stay `inside` the pass and
    share its rows. A sampled slot drafts as it would alone: its draws follow its drafts (a chain drawn from
    a draft model is accepted with a uniform per draft), so a seed gives its tokens whatever shares the pass.
    catch_up(slots): runs, before they draft, the catch-up passes of the slots about to draft with a drafter that
    keeps a cache (runtime/shared_catch_up.py)."""
    share = max(1, SHARED_PASS_ROWS // len(slots) - 1) if gen.trees_exact else 0  # per greedy slot
    by_lookup = lookup_slots(gen, slots) if len(slots) > 1 and not gen.trees_exact else {}
    drafting = []  # (slot, its plan or its room): the slots whose drafter drafts
    for s in slots:
        room = min(s.req.max_new_tokens - s.generated - 1, gen.max_seq_len - s.n)
        if s.fixed_output:
            room = min(room, inside)
            if len(slots) > 1:
                room = min(room, 1 if s.index in by_lookup else share)
        if s.index in by_lookup:
            s.prop = gen.propose_adaptive(s.context[:s.n], s.drafter, s.adapt, room, s.params, s.rng,
                                          by_lookup[s.index], lookup_only=True)
        elif s.adapt:  # alone it plans as Generator.steps does; shared, within the slot's share of the rows
            planned = gen.plan_adaptive(s.context[:s.n], s.drafter, s.adapt, room)
            if isinstance(planned, Proposal):
                s.prop = planned
            else:
                drafting.append((s, planned))
        else:
            drafting.append((s, room))
    if catch_up is not None and len(drafting) > 1:
        catch_up([s for s, plan in drafting if s.drafter and (plan.plan.head_depth if s.adapt else plan > 0)])
    for s, plan in drafting:
        if s.adapt:
            s.prop = gen.draft_planned(s.context[:s.n], s.drafter, s.adapt, plan, s.params, s.rng)
        else:
            s.prop = gen.propose(s.context[:s.n], s.drafter, s.req.k, s.req.tree, plan, s.reach, s.params, s.rng)


def lookup_slots(gen, slots: list[Slot]) -> dict[int, tuple]:
    """The greedy slots whose prompt-lookup node a shared pass over a one-path target verifies (the
    SHARED_LOOKUP_* rule), each with its match."""
    ranked = []
    for s in slots:
        if s.adapt is None or s.adapt.reach is None or not s.fixed_output:
            continue
        match = s.adapt.matches(gen.lookup_of(s.drafter), s.context[:s.n])  # the request's index, kept up to date
        estimate = s.adapt.lookup_estimate(match[1]) if match[1] else 0.0
        if estimate >= SHARED_LOOKUP_MIN:
            ranked.append((estimate, s.index, match))
    ranked.sort(key=lambda r: -r[0])
    return {index: match for _, index, match in ranked[:SHARED_LOOKUP_SLOTS]}
