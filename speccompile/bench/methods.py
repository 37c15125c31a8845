"""The speccompile methods a benchmark measures: plain autoregressive decoding and each chosen drafter."""
from __future__ import annotations

import contextlib

from speccompile.bench.settings import AUTOREGRESSIVE, Method
from speccompile.errors import SpeccompileError, given, option, reworded
from speccompile.format.trees import TreeSpec
from speccompile.runtime.request import check_depth
from speccompile.runtime.sampling import acceptance_option

ACCEPTANCES = ("exact", "typical")  # what a "~ACCEPTANCE" suffix may name (runtime.sampling.acceptance_option)


def split_method(spec: str) -> tuple[str, str | None]:
    """"NAME@TREE" -> (drafter NAME, its tree for this method); "NAME" -> (NAME, None). One run may so measure a
    drafter through several trees against the same autoregressive runs. A "~ACCEPTANCE" suffix (e.g.
    "mtp~typical", lossy) is the method's acceptance (split_acceptance)."""
    name, _, tree = split_acceptance(spec)[0].partition("@")
    return name, tree or None


def split_acceptance(spec: str) -> tuple[str, str | None]:
    """"SPEC~typical:0.09,0.3" -> ("SPEC", "typical:0.09,0.3"); no suffix: exact acceptance (None). The suffix
    follows the last '~'; after a static tree's file only one naming an acceptance (exact, typical) does, so
    that the file's name may hold '~' (and '@', which split_method reads only up to the first)."""
    head, tilde, acceptance = spec.rpartition("~")
    if not tilde or "@static:" in head and acceptance.partition(":")[0] not in ACCEPTANCES:
        return spec, None
    return head, acceptance or None


def speccompile_methods(gen, drafters: list[str], tree: str | None, temperature: float = 0.0,
                        top_k: int = 0) -> list[Method]:
    def runner(drafter, tree, acceptance=None):
        def run(ids, max_new_tokens):
            seed = sum(ids) % 2**32  # sampled runs: the same seed for a prompt under every method
            before = graph_seconds(gen)
            r = gen.generate(ids, max_new_tokens, drafter=drafter, speculate=drafter is not None, tree=tree,
                             temperature=temperature, top_k=top_k, seed=seed, acceptance=acceptance)
            after = graph_seconds(gen)
            graph_s = None if None in (before, after) else {k: after[k] - before[k] for k in after}
            return {"token_ids": r.token_ids, "stats": r.stats, "graph_s": graph_s}
        return run
    methods = [Method(AUTOREGRESSIVE, "speccompile", None, AUTOREGRESSIVE, None, runner(None, None))]
    for spec in drafters:
        name, own_tree = split_method(spec)
        methods.append(Method(spec, "speccompile", name, AUTOREGRESSIVE, None,
                              runner(name, own_tree or tree, split_acceptance(spec)[1])))
    return methods


@contextlib.contextmanager
def named_as_drafter(spec: str):
    """A refusal of an acceptance or tree that a --drafter spec carries, named as that --drafter (bench has no
    --acceptance, and its --tree is the default of the methods without their own)."""
    try:
        yield
    except SpeccompileError as e:
        whole = given("drafters", spec, flag="--drafter")
        raise reworded(e, {"acceptance": whole, "tree": whole,
                           "typical_epsilon": option("typical_epsilon", flag=f"EPS of --drafter {spec}"),
                           "typical_alpha": option("typical_alpha", flag=f"ALPHA of --drafter {spec}")}) from None


def graph_seconds(gen) -> dict[str, float] | None:
    """Seconds the target's and the drafters' graphs have spent inside onnxruntime so far (Engine.run_s), or None
    for engines that do not count them: a run's difference says where its time went, the rest being the host's."""
    drafters = [d.engine for d in gen.drafters.values() if getattr(d, "engine", None) is not None]
    seconds = [getattr(e, "run_s", None) for e in [gen.target, *drafters]]
    return None if None in seconds else {"target": seconds[0], "drafter": sum(seconds[1:])}


def choose_drafters(gen, wanted: tuple[str, ...], tree: str | None = None) -> list[str]:
    """The methods to measure: drafter names, each optionally NAME@TREE (default: every drafter of the bundle);
    tree: the one a method without its own verifies (--tree)."""
    unknown = [d for d in wanted if split_method(d)[0] not in gen.drafter_names]
    if unknown:
        raise SpeccompileError(f"drafter {split_method(unknown[0])[0]!r} is not in this bundle (it has: "
                               f"{', '.join(gen.drafter_names) or 'none'})")
    for d in wanted:  # a tree deeper than its drafter drafts fails here, before anything is timed
        name, own_tree = split_method(d)
        if own_tree:
            with named_as_drafter(d):
                check_depth(gen.drafters[name], None, TreeSpec.parse(own_tree))
        acceptance_option(split_acceptance(d)[1])
    check_distinct(wanted, tree)
    return list(wanted) or gen.drafter_names


def check_parts_named(spec: str) -> None:
    """"mtp@" and "mtp~" name no tree and no acceptance: refused, not measured as the bundle's tree and exact
    acceptance under a label that says otherwise."""
    head, acceptance = split_acceptance(spec)
    if head != spec and acceptance is None:
        raise SpeccompileError(f"--drafter {spec}: nothing after '~'; use NAME~exact or NAME~typical[:EPS[,ALPHA]]")
    if "@" in head and split_method(head)[1] is None:
        raise SpeccompileError(f"--drafter {spec}: nothing after '@'; use NAME@TREE, e.g. {head}chain:3")


def method_key(spec: str, tree: str | None) -> tuple:
    """What a method measures: its drafter, the tree it verifies (its own, else `tree`) and its acceptance."""
    name, own_tree = split_method(spec)
    tree = own_tree or tree
    acceptance = acceptance_option(split_acceptance(spec)[1])  # no suffix is exact acceptance
    return name, TreeSpec.parse(tree) if tree else None, tuple(sorted(acceptance.items()))


def check_distinct(wanted: tuple[str, ...], tree: str | None) -> None:
    """Two methods that measure the same thing (mtp@chain:3 and mtp@chain:3~exact; mtp with --tree chain:3 and
    mtp@chain:3) would be decoded twice as two rows: refused, naming both."""
    seen: dict[tuple, str] = {}
    for spec in wanted:
        key = method_key(spec, tree)
        if key in seen:
            same = "is named twice" if seen[key] == spec else f"and --drafter {spec} measure the same method"
            raise SpeccompileError(f"--drafter {seen[key]} {same} (drafter, tree and acceptance): give it once")
        seen[key] = spec
