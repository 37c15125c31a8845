"""Drafters that got worse: every lossless test passes when a drafter proposes garbage (the target corrects it), so
these hold the drafts themselves to a reference, with no timing: a draft model identical to the target has every
draft accepted, a head's deeper drafts are its teacher-forced guesses on its own earlier drafts, and a drafter
with a cache drafts what a fresh one drafts from the same context."""
import numpy as np
import pytest

from speccompile.compile.driver import build_bundle
from speccompile.compile.presets import tiny_mtp_head
from speccompile.compile.sources import load_checkpoint
from speccompile.format.bundle import read_manifest
from speccompile.runtime.engine import Engine
from speccompile.runtime.sampling import SamplingParams

from conftest import quiet, random_prompts

safetensors_numpy = pytest.importorskip("safetensors.numpy")


@pytest.fixture(scope="module")
def twin_bundle(tmp_path_factory):
    """The tiny target with itself as its draft model (same preset, same weights, float32 draft precision)."""
    out = str(tmp_path_factory.mktemp("twin") / "bundle")
    build_bundle("tiny:llama", out, drafts=["model:tiny:llama"], max_seq_len=256, num_draft=4,
                 draft_precision="float32", progress=quiet)
    return out


@pytest.fixture(scope="module")
def random_head_bundle(tmp_path_factory):
    """The tiny target with a random float32 MTP head: its drafts are wrong, but exactly reproducible."""
    d = tmp_path_factory.mktemp("mtp-random")
    safetensors_numpy.save_file(tiny_mtp_head(load_checkpoint("tiny:llama").config), str(d / "head.safetensors"))
    out = str(d / "bundle")
    build_bundle("tiny:llama", out, drafts=[f"mtp:{d / 'head.safetensors'}"], max_seq_len=256, num_draft=4,
                 draft_precision="float32", progress=quiet)
    return out


def _spy(drafter, seen):
    """Record every proposal's context and result (tree or chain) as the decode loop asks for them."""
    def wrap(propose):
        def spy(context, *args):
            prop = propose(context, *args)
            seen.append((np.array(context), prop))
            return prop
        return spy
    drafter.propose, drafter.propose_tree = wrap(drafter.propose), wrap(drafter.propose_tree)


def _live_chains(g, seen: list, prompt, max_new_tokens: int, **kwargs) -> list:
    """(context, drafted tokens) of every proposal one generation asks its drafter for (seen: _spy's list)."""
    seen.clear()
    g.generate(prompt, max_new_tokens, **kwargs)
    return [(c, p.tokens.copy()) for c, p in seen]


def _only_model_drafter(g):
    (name,) = [n for n in g.drafters if n not in ("lookup",)]
    return name


def _rates(g, name, tree):
    """Per prompt, the acceptance rate of each draft depth."""
    return [g.generate(prompt, 40, drafter=name, **({"tree": tree} if tree else {"num_draft": 4}))
            .stats["acceptance_rate_per_depth"] for prompt in random_prompts(4)]


@pytest.mark.parametrize("tree", [None, "chain:4"])
def test_a_draft_model_identical_to_the_target_has_every_draft_accepted(twin_bundle, tree):
    """Every draft at every depth is the target's own greedy token: one made from the wrong position, rank or
    cache would be rejected."""
    import speccompile
    g = speccompile.load(twin_bundle, threads=1)
    for rates in _rates(g, _only_model_drafter(g), tree):
        assert rates == [1.0] * 4


@pytest.mark.parametrize("tree", ["chain:4", "dynamic:16"])
def test_one_path_targets_accept_the_identical_draft_models_first_path(twin_bundle, tree, monkeypatch):
    """A target that verifies one path a pass (a 4-bit one: graphs.trees_exact) verifies the tree's first path:
    the drafter's best-ranked continuation, each node's likeliest child, which the target then accepts whole."""
    import speccompile
    g = speccompile.load(twin_bundle, threads=1)
    monkeypatch.setattr(g, "trees_exact", False)
    for rates in _rates(g, _only_model_drafter(g), tree):
        assert len(rates) >= 4 and rates == [1.0] * len(rates)


def test_a_draft_models_live_drafts_are_a_fresh_ones(tiny_generator):
    """The draft model keeps its K/V between passes and rolls back what the target rejected: each live chain
    equals what a freshly reset draft model proposes from the same context."""
    g = tiny_generator
    drafter, seen = g.drafters["model"], []
    _spy(drafter, seen)
    try:
        for prompt in random_prompts(3):
            live = _live_chains(g, seen, prompt, 30, drafter="model", num_draft=4)
            assert len(live) >= 5
            for context, tokens in live:
                drafter.reset()
                assert drafter.propose(context, len(tokens), _greedy(), None).tokens.tolist() == tokens.tolist()
        # a context that leaves the cached one mid-way (not just at its end) is re-synchronised too; compared by
        # the draft distributions, since this random model's greedy drafts hardly depend on more than a token
        context = live[-1][0]
        other = context.copy()
        other[len(other) // 2:] = (other[len(other) // 2:] + 1) % 384
        sampled = SamplingParams(temperature=1.0)
        drafter.propose(context, 4, sampled, np.random.default_rng(0))
        after_context = drafter.propose(other, 4, sampled, np.random.default_rng(0))
        drafter.reset()
        fresh = drafter.propose(other, 4, sampled, np.random.default_rng(0))
        assert np.allclose(after_context.q, fresh.q, atol=1e-6)
    finally:
        del drafter.propose, drafter.propose_tree
        drafter.reset()


def _greedy():
    return SamplingParams(temperature=0.0)


def _tree(spec):
    from speccompile.format.trees import TreeSpec
    return TreeSpec.parse(spec)


def _head_reference(bundle, g, context, tokens, parents):
    """Each draft's log-probability row and its parent's, teacher-forced on a head engine of its own: the target's
    hidden states of the context, the head over every pair (h_t, x_{t+1}), then each draft fed on its parent's
    output hidden state at the position after its parent. Returns per node the reference log-probabilities its
    token was chosen from."""
    m = read_manifest(bundle)
    target, head = g.target, g.drafters["mtp"]
    n = len(context)
    target.cache.truncate(0)
    target.forward(context)  # hidden states of every row
    h = head.features(target, np.arange(n)).copy()
    target.cache.truncate(0)
    eng = Engine(bundle, m["models"]["mtp_head"], threads=1, max_rows=16)
    logits, _ = eng.forward(context[1:], positions=np.arange(1, n), hidden_in=h[:n - 1])  # the last row's logits
    root = (logits[0].astype(np.float64), eng.hidden[n - 2].copy())
    eng.cache.truncate(n - 1)
    out, state = [], {-1: root}
    for i, (tok, p) in enumerate(zip(tokens, parents)):
        out.append(state[int(p)][0])
        path = _ancestors(parents, i)  # the node's ancestors, then itself: its own row sees just those
        eng.cache.truncate(n - 1)
        for j, v in enumerate(path):
            lg, _ = eng.forward(np.array([tokens[v]]), positions=np.array([n + j]),
                                hidden_in=state[int(parents[v])][1][None])
            eng.cache.truncate(n - 1 + j + 1)
        state[i] = (lg[0].astype(np.float64), eng.hidden[0].copy())
    return out


def _ancestors(parents, i):
    path = []
    while i >= 0:
        path.append(i)
        i = int(parents[i])
    return path[::-1]


@pytest.mark.parametrize("tree", [None, "chain:3", "dynamic:6"])
def test_a_heads_deeper_drafts_are_its_teacher_forced_guesses(random_head_bundle, tree):
    """Every node an MTP head drafts is its top choice (a dynamic tree: among its top `branching`, best first)
    after the head read its parent's output hidden state at the parent's next position: a head fed the root's
    hidden state, the wrong position, or the wrong candidates still decodes losslessly, and fails here."""
    import speccompile
    g = speccompile.load(random_head_bundle, threads=1)
    seen = []
    _spy(g.drafters["mtp"], seen)
    spec = _tree(tree) if tree else None
    for prompt in random_prompts(3):
        seen.clear()
        g.generate(prompt, 24, drafter="mtp", **({"tree": tree} if tree else {"num_draft": 3}))
        props = [(c, p) for c, p in seen if p.depth >= 2]
        assert len(props) >= 3
        for context, prop in props[:4]:
            parents = np.arange(len(prop.tokens)) - 1 if prop.parents is None else prop.parents
            rows = _head_reference(random_head_bundle, g, context, prop.tokens, parents)
            ranks = 1 if spec is None or spec.kind != "dynamic" else spec.branching
            for i, (tok, lp) in enumerate(zip(prop.tokens, rows)):
                top = np.sort(lp)[::-1]
                assert lp[tok] >= top[ranks - 1] - 1e-4, (i, tok)
            siblings = {}
            for i, p in enumerate(parents):
                siblings.setdefault(int(p), []).append(rows[i][prop.tokens[i]])
            assert all(np.all(np.diff(s) <= 1e-4) for s in siblings.values())  # best-ranked child first


def _lookup_reference(context, max_ngram, depth):
    """Prompt lookup spelled out: the longest n <= max_ngram whose last n tokens occurred earlier, and the tokens
    that followed each earlier occurrence, most recent first."""
    context = [int(t) for t in context]
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        suffix = context[-n:]
        found = [context[i + n:i + n + depth] for i in range(len(context) - n - 1, -1, -1)
                 if context[i:i + n] == suffix]
        if found:
            return n, found
    return 0, []


@pytest.mark.parametrize("max_ngram", [1, 3])
def test_lookup_drafts_what_followed_the_longest_most_recent_match(max_ngram):
    """On contexts over a few tokens (many matches of every length), the chain and each continuation in a
    lookup tree's trie are the reference's."""
    from speccompile.runtime.drafters.base import Proposal
    from speccompile.runtime.drafters.lookup import LookupDrafter, join_lookup
    rng = np.random.default_rng(0)
    lookup = LookupDrafter(max_ngram=max_ngram)
    for _ in range(200):
        context = rng.integers(0, 4, int(rng.integers(2, 30)))
        n, found = _lookup_reference(context, max_ngram, 3)
        assert lookup.matches(context)[1] == n
        assert lookup.propose(context, 3, None, None).tokens.tolist() == (found[0] if found else [])
        tree = join_lookup(Proposal.empty(), context, lookup, nodes=64, depth=3)
        paths = {tuple(tree.tokens[i] for i in _ancestors(tree.parents, i)) for i in range(len(tree.tokens))}
        want = {tuple(c[:d]) for c in found[:lookup.max_matches] for d in range(1, len(c) + 1)}
        assert paths == want and tree.match_len == n


@pytest.mark.parametrize("max_ngram", [1, 3])
def test_the_match_index_finds_the_scans_matches_as_a_context_grows(max_ngram):
    """MatchIndex (adaptive drafting's per-request index) against LookupDrafter.matches's scan: the same starts in
    the same order and n at every length of contexts grown a few tokens a pass; another context (shorter, or
    another token where the indexed one ended) is indexed again."""
    from speccompile.runtime.drafters.lookup import LookupDrafter, MatchIndex
    rng = np.random.default_rng(1)
    lookup = LookupDrafter(max_ngram=max_ngram)
    for _ in range(60):
        context, index, n = rng.integers(0, int(rng.integers(2, 20)), 200), MatchIndex(lookup), 1
        while n <= len(context):
            want, got = lookup.matches(context[:n]), index.matches(context[:n])
            assert got[1] == want[1] and got[0].tolist() == want[0].tolist()
            n += int(rng.integers(1, 5))
        other = rng.integers(0, 5, 50)
        for ctx in (other, other[:20]):
            assert index.matches(ctx)[0].tolist() == lookup.matches(ctx)[0].tolist()


def test_a_static_trees_ranks_are_the_drafters_ranks():
    """Rank r of a static tree's path is the drafter's r-th likeliest token after the node's parent: siblings
    distinct, likeliest first (a draft engine standing in with fixed pseudo-random logits)."""
    from speccompile.format.trees import TreeSpec
    from speccompile.runtime.drafters.draft_model import _log_softmax, _TreeDraft, grow_tree
    from test_trees import MEDUSA_LIKE, _FakeDraftEngine
    tree = TreeSpec.from_paths(MEDUSA_LIKE)
    for seed in range(5):
        root = _log_softmax(np.random.default_rng(seed).standard_normal(50))
        t = _TreeDraft(_FakeDraftEngine(50, 1.0), 0, 0, root)
        prop = t.proposal(grow_tree(t, tree, tree.size))
        assert len(prop.tokens) == len(MEDUSA_LIKE)
        for parent in {-1, *range(len(prop.tokens))}:
            kids = [int(tok) for tok, p in zip(prop.tokens, prop.parents) if p == parent]
            if not kids:  # a leaf: never run
                continue
            lp = root if parent < 0 else t.logprobs[_node_of(t, prop, parent)]
            assert kids == np.argsort(-lp, kind="stable")[:len(kids)].tolist()


def _node_of(t, prop, i):
    """The _TreeDraft node of the proposal's row i (same token, same path)."""
    path = [int(prop.tokens[v]) for v in _ancestors(prop.parents, i)]
    for v in range(len(t.tokens)):
        mine, u = [], v
        while u >= 0:
            mine.append(t.tokens[u])
            u = t.parents[u]
        if mine[::-1] == path:
            return v


def test_medusa_live_drafts_are_its_heads_guesses_teacher_forced(tmp_path):
    """Medusa-1: head k on the target's hidden state at t guesses x_{t+k+2}. Each live chain is, head by head,
    the heads' argmax on the hidden state of the context's next-to-last position, taken from a fresh target pass
    over the context: heads fed another position's state, or taken out of order, are still lossless."""
    import speccompile
    from test_mtp import medusa_heads
    safetensors_numpy.save_file(medusa_heads(load_checkpoint("tiny:llama").config, K=3, prefix="medusa_head."),
                                str(tmp_path / "m.safetensors"))
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=[f"medusa:{tmp_path / 'm.safetensors'}"], max_seq_len=256, num_draft=3,
                 progress=quiet)
    g = speccompile.load(out, threads=1)
    head, seen = g.drafters["medusa"], []
    _spy(head, seen)
    for prompt in random_prompts(3):
        live = _live_chains(g, seen, prompt, 24, drafter="medusa", num_draft=3)
        assert len(live) >= 3
        for context, tokens in live:
            g.target.cache.truncate(0)
            g.target.forward(context)
            h = head.features(g.target, np.arange(len(context)))[len(context) - 2]
            logits = head.session.run(["logits"], {"hidden_in": np.ascontiguousarray(h[None], np.float32)})[0]
            assert tokens.tolist() == logits[:len(tokens)].argmax(-1).tolist()
        g.target.cache.truncate(0)


def _uncoupled(monkeypatch):
    """Drafters that ignore the request's noise (Drafter.couple a no-op): their greedy argmax drafted."""
    from speccompile.runtime.drafters.base import Drafter
    monkeypatch.setattr(Drafter, "couple", lambda self, noise: setattr(self, "noise", None))


@pytest.mark.parametrize("tree,one_path", [(None, False), ("chain:4", False), ("dynamic:16", True)])
def test_a_twin_draft_models_coupled_draws_are_all_accepted(twin_bundle, tree, one_path, monkeypatch):
    """Sampled by noise, a drafter adds the request's noise row of each position to its own logits
    (Drafter.couple): a draft model identical to the target then draws the target's own token at every depth,
    all accepted at a temperature where the tiny model's argmax is drawn only now and then (uncoupled, the same
    drafts are mostly rejected). A row taken from the wrong position or depth would be rejected."""
    import speccompile
    g = speccompile.load(twin_bundle, threads=1)
    monkeypatch.setattr(g, "trees_exact", not one_path)
    name = _only_model_drafter(g)
    kwargs = {"tree": tree} if tree else {"num_draft": 4}

    def rates():
        return [g.generate(p, 40, drafter=name, temperature=8.0, seed=i, **kwargs).stats["acceptance_rate_per_depth"]
                for i, p in enumerate(random_prompts(4))]
    for r in rates():
        assert len(r) >= 4 and r == [1.0] * len(r)
    _uncoupled(monkeypatch)
    assert np.mean([r[0] for r in rates()]) < 0.5


@pytest.mark.parametrize("tree", [None, "chain:3", "dynamic:6"])
def test_a_heads_coupled_drafts_are_its_noisy_teacher_forced_guesses(random_head_bundle, tree):
    """Sampled by noise, every node an MTP head drafts is the top (a dynamic tree: among the top `branching`,
    best first) of its teacher-forced logits plus the request's noise row at the node's position (the context's
    length plus its depth less one)."""
    import speccompile
    from speccompile.runtime.noise import GumbelNoise
    g = speccompile.load(random_head_bundle, threads=1)
    seen, spec, T = [], _tree(tree or "chain:3"), 8.0
    _spy(g.drafters["mtp"], seen)
    for seed, prompt in enumerate(random_prompts(3)):
        seen.clear()
        shape = {"tree": tree} if tree else {"num_draft": 3}
        g.generate(prompt, 24, drafter="mtp", temperature=T, seed=seed, **shape)
        noise = GumbelNoise(seed, T, g.target.vocab_size)
        props = [(c, p) for c, p in seen if p.depth >= 2]
        assert len(props) >= 3
        for context, prop in props[:4]:
            parents = np.arange(len(prop.tokens)) - 1 if prop.parents is None else prop.parents
            rows = _head_reference(random_head_bundle, g, context, prop.tokens, parents)
            level = np.array([len(_ancestors(parents, i)) for i in range(len(parents))])  # 1 at the root's children
            ranks = 1 if spec.kind != "dynamic" else spec.branching
            noisy = [lp + noise.rows([len(context) + d - 1])[0] for lp, d in zip(rows, level)]
            for i, (tok, lp) in enumerate(zip(prop.tokens, noisy)):
                assert lp[tok] >= np.sort(lp)[::-1][ranks - 1] - 1e-4, (i, tok)
            siblings = {}
            for i, p in enumerate(parents):
                siblings.setdefault(int(p), []).append(noisy[i][prop.tokens[i]])
            assert all(np.all(np.diff(s) <= 1e-4) for s in siblings.values())  # best-ranked child first
