"""Token trees: shapes, tree acceptance and compaction, and tree decoding identical to plain decoding."""
import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from speccompile.errors import SpeccompileError
from speccompile.runtime.kv_cache import KVCache
from speccompile.format.trees import TreeSpec, depths
from speccompile.runtime.acceptance import accept_greedy, accept_sampled, committed_rows, sequential

from conftest import assert_lossless, random_prompts
from test_decoding import chi2_pvalue

MEDUSA_LIKE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]


def test_tree_specs(tmp_path):
    assert TreeSpec.parse("chain:3").paths == ((0,), (0, 0), (0, 0, 0))
    f = tmp_path / "t.json"
    f.write_text(json.dumps(MEDUSA_LIKE))
    t = TreeSpec.parse(f"static:{f}")
    assert t.size == 9 and t.depth == 4 and t.max_rank == 3
    assert TreeSpec.parse("dynamic:16").size == 16
    f.write_text(json.dumps([[0, 1]]))
    with pytest.raises(SpeccompileError, match="no parent"):
        TreeSpec.parse(f"static:{f}")
    joined = TreeSpec.parse("dynamic:4+lookup:6")
    assert (joined.kind, joined.size, joined.lookup) == ("dynamic", 4, 6)
    assert TreeSpec.from_dict(joined.to_dict()) == joined
    for bad in ("chain:x", "dynamic:0", "dynamic:500", "bush:3", "static:/nope.json", "chain:2+lookup:0",
                "chain:2+lookup:x", "chain:2+ngram:3", "chain:2+lookup:99", "chain:3+lookup:²"):
        with pytest.raises(SpeccompileError):
            TreeSpec.parse(bad)


@pytest.mark.parametrize("spec", ["chain:1_0", "chain:٣", "dynamic: 8", "dynamic:٨", "adaptive:2 ", "chain:-1",
                                  "adaptive:"])
def test_tree_sizes_are_plain_whole_numbers(spec):
    """int() would read "1_0" as 10, "٣" as 3 and pass spaces and signs: sizes other than were written."""
    with pytest.raises(SpeccompileError, match="expected a whole number"):
        TreeSpec.parse(spec)


def test_a_static_tree_nested_too_deep_is_a_clean_error(tmp_path):
    """json raises RecursionError, not ValueError, on deep nesting: it reached the API as that."""
    f = tmp_path / "deep.json"
    f.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(SpeccompileError, match="deep.json is not JSON"):
        TreeSpec.parse(f"static:{f}")
    with pytest.raises(SpeccompileError, match="joins a shape"):
        TreeSpec.parse("+lookup:3")


@pytest.mark.parametrize("name", ["a+b.json", "t+lookup:3.json", "x~y@z.json", "+3.json"])
def test_a_static_tree_file_may_have_any_name(tmp_path, name):
    """'+' in a static tree's file name was read as the +lookup:L join; a last +lookup:L after it still joins, and
    a bench method's NAME@TREE~ACCEPTANCE keeps '@' and '~' in the file's name to the tree."""
    from speccompile.bench.methods import split_acceptance, split_method
    f = tmp_path / name
    f.write_text(json.dumps(MEDUSA_LIKE))
    assert TreeSpec.parse(f"static:{f}").size == 9
    joined = TreeSpec.parse(f"static:{f}+lookup:4")
    assert (joined.size, joined.lookup) == (9, 4)
    assert split_method(f"mtp@static:{f}") == ("mtp", f"static:{f}")
    assert split_acceptance(f"mtp@static:{f}~typical:0.1") == (f"mtp@static:{f}", "typical:0.1")
    assert split_method(f"mtp@static:{f}~typical:0.1") == ("mtp", f"static:{f}")
    with pytest.raises(SpeccompileError, match="no such file"):
        TreeSpec.parse(f"static:{tmp_path / 'missing+b.json'}")


@pytest.mark.parametrize("spec", ["chain:+3", "dynamic:+4", "adaptive:+2"])
def test_a_signed_size_is_not_read_as_a_join(spec):
    with pytest.raises(SpeccompileError, match="expected a whole number"):
        TreeSpec.parse(spec)


@pytest.mark.parametrize("paths", [[[0.9], [1.7], [1.7, 2.9]], [[True], [True, False]], ["0", "01"], [[0], 5],
                                   {"0": [0]}])
def test_static_tree_ranks_are_taken_as_given_or_refused(tmp_path, paths):
    """int() would read 1.7 as rank 1, True as 1 and "01" as the path (0, 1): other trees than were written."""
    f = tmp_path / "t.json"
    f.write_text(json.dumps(paths))
    with pytest.raises(SpeccompileError, match="integer ranks"):
        TreeSpec.parse(f"static:{f}")


def test_a_hand_built_tree_spec_is_refused_unless_parse_would_make_it(tiny_generator):
    """A TreeSpec built field by field (a chain without its paths drafted nothing, silently; a numpy depth reached
    the drafters' index sums) is refused by name; the ones parse and from_paths make, and the bundle's own, run."""
    from speccompile.format.trees import TreeSpec as Spec
    for hand_made in (Spec("chain", 3), Spec("bogus", 5), Spec("dynamic", 4, depth=np.uint64(3)),
                      Spec("dynamic", 4, depth=4, lookup=999),
                      dataclasses.replace(Spec.parse("dynamic:4"), size=np.int64(4)),  # equal to parse's, but numpy
                      dataclasses.replace(Spec.parse("chain:3+lookup:2"), lookup=np.int64(2))):
        with pytest.raises(SpeccompileError, match=r"^tree=TreeSpec\(.*made by TreeSpec.parse"):
            tiny_generator.generate("hello", 4, drafter="lookup", tree=hand_made)
    for made in (Spec.parse("chain:3"), Spec.parse("dynamic:4+lookup:2"), Spec.from_paths([[0], [1], [0, 0]])):
        assert made.checked() is made
        assert tiny_generator.generate("hello", 4, drafter="lookup", tree=made).token_ids


def test_the_committed_rows_are_the_pending_tokens_and_the_accepted_nodes():
    """A verify block's row 0 is the pending token, row i + 1 node i: a drafter observes those rows' features, a
    plain step's as a slice of its one row."""
    hidden = np.arange(12.0).reshape(6, 2)
    assert committed_rows([]) == slice(0, 1) and hidden[committed_rows([])].tolist() == [[0.0, 1.0]]
    assert hidden[committed_rows([0, 2, 4])].tolist() == hidden[[0, 1, 3, 5]].tolist()


def test_accept_tree_greedy_walks_the_matching_path():
    #          node: 0  1  2  3  4  5
    tokens = np.array([5, 6, 7, 8, 9, 7])
    parents = np.array([-1, -1, 0, 0, 2, 1])
    # row 0 = pending token, row 1+i = node i; the target wants 5, then 8 after node 0, then 1 after node 3
    argmax = np.array([5, 8, 0, 0, 1, 0, 0])
    path, bonus = accept_greedy(tokens, parents, argmax)
    assert path == [0, 3] and bonus == 1
    assert accept_greedy(tokens, parents, np.array([4, 0, 0, 0, 0, 0, 0])) == ([], 4)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 20), seed=st.integers(0, 2**31), committed=st.integers(0, 30))
def test_compaction_moves_the_accepted_path(n, seed, committed):
    """After compaction, the cache holds the accepted path's K/V contiguously after the committed tokens,
    the committed tokens untouched."""
    rng = np.random.default_rng(seed)
    parents = np.array([-1] + [int(rng.integers(-1, i)) for i in range(1, n)])
    leaf = int(rng.integers(0, n))
    path = [leaf]
    while parents[path[-1]] >= 0:
        path.append(int(parents[path[-1]]))
    path = np.array(path[::-1])
    cache = KVCache(2, 1, 64, 4)
    cache.key[:] = rng.standard_normal(cache.key.shape)
    before = cache.key.copy()
    cache.compact(committed + path, committed)
    assert np.array_equal(cache.key[:, :, :, :committed], before[:, :, :, :committed])
    assert np.array_equal(cache.key[:, :, :, committed:committed + len(path)], before[:, :, :, committed + path])
    assert (depths(parents)[path] == np.arange(len(path))).all()


def test_accept_tree_sampled_keeps_target_distribution():
    rng = np.random.default_rng(0)
    V = 5
    p = rng.dirichlet(np.ones(V), size=4)
    tokens = np.array([1, 3, 1])  # two candidates at the root (1, 3), then a child of the first
    parents = np.array([-1, -1, 0])
    counts = np.zeros(V)
    for _ in range(20000):
        path, bonus = accept_sampled(tokens, parents, p, sequential(rng))
        counts[tokens[path[0]] if path else bonus] += 1
    assert chi2_pvalue(counts, p[0]) > 1e-3


@pytest.mark.parametrize("drafter", ["lookup", "layerskip:2", "model"])
@pytest.mark.parametrize("tree", ["static", "dynamic:12", "chain:4"])
def test_greedy_tree_decoding_equals_autoregressive(tiny_generator, drafter, tree, tmp_path):
    if tree == "static":
        f = tmp_path / "tree.json"
        f.write_text(json.dumps(MEDUSA_LIKE))
        tree = f"static:{f}"
    assert max(assert_lossless(tiny_generator, drafter, random_prompts(10), 40, tree)) > 1.0


@pytest.mark.parametrize("drafter", ["model", "lookup"])
def test_sampled_tree_decoding_matches_target_distribution(tiny_generator, drafter):
    from test_decoding import test_sampled_speculative_matches_target_distribution as check
    check(tiny_generator, drafter, tree="dynamic:8")


def test_lookup_proposes_what_followed_the_most_recent_match():
    """The longest suffix n-gram that occurred before, its continuations most recent first; a chain follows the
    most recent one."""
    from speccompile.runtime.drafters.lookup import LookupDrafter
    d = LookupDrafter(max_ngram=3)
    context = np.array([5, 6, 7, 1, 2, 9, 5, 6, 7, 3, 4, 8, 5, 6, 7])
    starts, n = d.matches(context)
    assert n == 3 and starts.tolist() == [9, 3]
    assert d.propose(context, 2, None, None).tokens.tolist() == [3, 4]
    starts, n = d.matches(np.array([4, 9, 8, 4]))  # only the last token occurred before
    assert n == 1 and starts.tolist() == [1]


def test_join_lookup_merges_continuations_as_a_trie():
    from speccompile.runtime.drafters.base import Proposal
    from speccompile.runtime.drafters.lookup import LookupDrafter, join_lookup
    #                    0  1  2  3  4  5  6  7  8  9 10
    context = np.array([7, 1, 2, 3, 4, 9, 1, 2, 5, 6, 1])  # "1" occurred at 1 and 6: continuations 2 5 6.., 2 3 4..
    drafted = Proposal(np.array([2, 8]), None, np.array([-1, 0]))  # the drafter's tree: 2 -> 8
    out = join_lookup(drafted, context, LookupDrafter(max_ngram=1), nodes=4, depth=3)
    paths = {tuple(_path(out, i)) for i in range(len(out.tokens))}
    # the most recent match (2 5 6) extends the shared "2", the older one (2 3 4) gets the last of the budget
    assert paths == {(2,), (2, 8), (2, 5), (2, 5, 6), (2, 3), (2, 3, 4)}
    assert list(out.tokens[:2]) == [2, 8] and out.q is None  # the drafter's nodes first, in its order
    chain = join_lookup(Proposal(np.array([2, 5])), context, LookupDrafter(max_ngram=1), nodes=1, depth=3)
    assert [tuple(_path(chain, i)) for i in range(len(chain.tokens))] == [(2,), (2, 5), (2, 5, 6)]
    none = join_lookup(drafted, np.array([1, 2, 3]), LookupDrafter(), nodes=4, depth=3)  # no earlier "3"
    assert list(none.tokens) == [2, 8] and none.match_len == 0 and not none.lookup_agrees.any()


def test_join_lookup_reports_its_match_length_and_where_it_agrees_with_the_drafter():
    """What adaptive drafting's estimates are kept by: the n-gram the continuations matched on, and which of the
    drafter's nodes the most recent match's continuation runs through (an older match's agreement aside)."""
    from speccompile.runtime.drafters.base import Proposal
    from speccompile.runtime.drafters.lookup import LookupDrafter, join_lookup
    context = np.array([7, 1, 2, 3, 4, 9, 1, 2, 5, 6, 1])
    drafted = Proposal(np.array([2, 8, 3]), None, np.array([-1, 0, 0]))  # 2 -> 8 and 2 -> 3
    out = join_lookup(drafted, context, LookupDrafter(max_ngram=1), nodes=4, depth=3)
    assert out.match_len == 1
    # the most recent match (2 5 6) agrees on "2"; the older one (2 3 4) runs through "3" too, but is not counted
    assert out.lookup_agrees.tolist() == [True, False, False] + [False] * (len(out.tokens) - 3)
    repeat = np.array([4, 5, 6, 7, 8, 1, 4, 5, 6])  # the last 3-gram occurred before: continuation 7 8 1
    out = join_lookup(Proposal(np.array([7, 8])), repeat, LookupDrafter(max_ngram=3), nodes=2, depth=4)
    assert out.match_len == 3 and out.lookup_agrees.tolist() == [True, True, False, False]
    assert out.tokens.tolist() == [7, 8, 1, 4]


def _path(prop, i):
    out = []
    while i >= 0:
        out.append(int(prop.tokens[i]))
        i = int(prop.parents[i])
    return out[::-1]


@pytest.mark.parametrize("tree", ["dynamic:3+lookup:4", "chain:2+lookup:6"])
def test_trees_joined_by_lookup_decode_losslessly(tiny_generator, tree):
    """A drafter's tree joined by prompt lookup: greedy output unchanged, and the joined nodes get accepted on
    prompts that repeat themselves, where the draft model alone is weaker."""
    prompts = random_prompts(10)
    joined = assert_lossless(tiny_generator, "layerskip:2", prompts, 40, tree)
    alone = assert_lossless(tiny_generator, "layerskip:2", prompts, 40, tree.split("+")[0])
    assert np.mean(joined) > np.mean(alone)


def test_sampled_tree_joined_by_lookup_matches_target_distribution(tiny_generator):
    from test_decoding import test_sampled_speculative_matches_target_distribution as check
    check(tiny_generator, "layerskip:2", tree="dynamic:4+lookup:4")


class _FakeDraftEngine:
    """Stands in for a draft engine in _TreeDraft: deterministic pseudo-random logits per (token, position),
    sharpened or flattened by `temperature`; counts passes."""

    class _Cache:
        length = 0

        def truncate(self, n):
            self.length = n

    def __init__(self, vocab: int, temperature: float, max_seq_len: int = 1024):
        self.vocab, self.temperature, self.passes = vocab, temperature, 0
        self.cache, self.max_seq_len = self._Cache(), max_seq_len

    def forward(self, tokens, positions, parents, rows, committed, hidden_in=None):
        self.passes += 1
        logits = np.stack([np.random.default_rng(int(t) * 1009 + int(p)).standard_normal(self.vocab)
                           for t, p in zip(tokens, positions)]) / self.temperature
        return logits, None


def _grow_unpruned(t, tree, size):
    """EAGLE-2's expansion without the bar: expand the top `branching` frontier nodes at every depth."""
    b = tree.branching
    frontier = [t.add(-1, tok, lp) for tok, lp in t.children(-1, b)]
    for _ in range(tree.depth - 1):
        expand = sorted(frontier, key=lambda v: -t.scores[v])[:b]
        t.run(expand)
        frontier = [t.add(v, tok, lp) for v in expand for tok, lp in t.children(v, b)]
    return sorted(range(len(t.tokens)), key=lambda v: (-t.scores[v], t.depth[v]))[:size]


@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("size", [3, 8, 20])
def test_dynamic_tree_cut_keeps_the_same_nodes(temperature, size):
    """Skipping frontier nodes below the size-th best score (and stopping when none is left) proposes exactly the
    tree of the full expansion; on flat draft distributions it needs fewer draft passes."""
    from speccompile.runtime.drafters.draft_model import _log_softmax, _TreeDraft, grow_tree
    tree = TreeSpec.parse(f"dynamic:{size}")
    for seed in range(5):
        root = _log_softmax(np.random.default_rng(seed).standard_normal(50) / temperature)
        props, passes = [], []
        for grow in (grow_tree, _grow_unpruned):
            eng = _FakeDraftEngine(50, temperature)
            t = _TreeDraft(eng, 0, 0, root)
            p = t.proposal(grow(t, tree, size))
            props.append(p)
            passes.append(eng.passes)
        assert np.array_equal(props[0].tokens, props[1].tokens)
        assert np.array_equal(props[0].parents, props[1].parents)
        assert passes[0] <= passes[1]
    if temperature == 3.0 and size == 3:  # flat drafts: the depth-1 candidates alone fill the budget
        assert passes[0] < passes[1]


def test_lookup_reach_doubles_on_whole_branches_and_resets_on_a_miss():
    from speccompile.runtime.drafters.lookup import LookupReach
    r = LookupReach(base=3, limit=12)
    r.update(accepted=3, deepest=3)
    assert r.reach == 6
    r.update(accepted=6, deepest=6)
    r.update(accepted=12, deepest=12)
    assert r.reach == 12  # held at the limit
    r.update(accepted=5, deepest=12)
    assert r.reach == 3
    r.update(accepted=0, deepest=0)  # nothing drafted: stays at the base
    assert r.reach == 3


def test_joined_lookup_reaches_deeper_on_repeating_output(tiny_generator):
    """On output that repeats itself, the joined tree's lookup continuations grow past L (LookupReach), so a
    pass commits more than the tree's depth + 1 tokens -- and greedy output is still unchanged."""
    prompts = random_prompts(10)
    assert_lossless(tiny_generator, "layerskip:2", prompts, 64, "chain:1+lookup:2")
    longest = max(max(tiny_generator.generate(p, 64, drafter="layerskip:2", tree="chain:1+lookup:2")
                      .stats["committed_per_pass"]) for p in prompts)
    assert longest > 3


@pytest.mark.parametrize("drafter", ["layerskip:2", "model"])
def test_tree_drafting_fills_the_context_to_its_end(tiny_generator, drafter):
    """A prompt plus its new tokens filling the compiled context exactly: the draft model's tree runs only as
    many nodes as its cache has slots left (it used to overflow it)."""
    g = tiny_generator
    base = random_prompts(2)[1]
    prompt = (base * (g.max_seq_len // len(base) + 1))[:g.max_seq_len - 20]  # repeats: long drafts get accepted
    ref = g.generate(prompt, 20, speculate=False)
    for tree in ("dynamic:12", "chain:6"):
        assert g.generate(prompt, 20, drafter=drafter, tree=tree).token_ids == ref.token_ids


def test_inspect_names_a_tree_as_tree_spells_it():
    """inspect once called the default bundle's adaptive tree "adaptive of 63 nodes", dropping its depth and the
    lookup it joins (63 is only the most rows a pass may verify)."""
    from speccompile.format.summary import tree_label
    assert tree_label({"kind": "adaptive", "size": 63, "depth": 4, "lookup": 6}) == \
        "adaptive:4+lookup:6 (at most 63 nodes a pass)"
    assert tree_label({"kind": "adaptive", "size": 63, "depth": 4, "lookup": 0}) == \
        "adaptive:4 (at most 63 nodes a pass)"
    assert tree_label({"kind": "dynamic", "size": 12, "lookup": 6}) == "dynamic:12+lookup:6"
    assert tree_label({"kind": "chain", "size": 4, "lookup": 0}) == "chain:4"
    for spec in ("dynamic:12+lookup:6", "chain:4", "adaptive:3+lookup:2"):  # what inspect shows, --tree takes
        assert tree_label(TreeSpec.parse(spec).to_dict()).split(" (")[0] == spec


def test_inspect_shows_a_tree_drafter_by_its_tree(tiny_bundle):
    """A drafter with a tree drafts the tree each pass: its num_draft (what --num-draft would replace the tree with)
    is not its tokens per pass."""
    from speccompile.format.bundle import read_manifest
    from speccompile.format.summary import describe
    m = read_manifest(tiny_bundle)
    m["drafters"][0]["tree"] = TreeSpec.parse("dynamic:5").to_dict()
    lines = [line for line in describe(tiny_bundle, m, True) if line.startswith("drafter")]
    assert lines[0] == f"drafter     {m['drafters'][0]['name']} ({m['drafters'][0]['kind']}, tree dynamic:5)"
    assert f"{m['drafters'][1]['num_draft']} tokens per pass" in lines[1]
