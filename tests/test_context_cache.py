"""The context cache: hit and miss tokens counted, LRU eviction within a byte budget, the disk tier (round trip,
corrupt and foreign files ignored), and output with the cache equal to output without it, for every drafter kind
that keeps state, greedy and sampled, over the turns of a chat."""
import gc
import io
import os
import warnings
import zipfile

import numpy as np
import pytest

import speccompile
from speccompile.compile.driver import build_bundle
from speccompile.errors import SpeccompileError
from speccompile.runtime.context_cache import ContextCache, Part, block_bytes
from speccompile.runtime.sampling import SamplingParams
from speccompile.runtime.streams import drain

from conftest import quiet, random_prompts

B = 4  # block tokens of the unit tests


def unit_cache(max_bytes=1 << 20, cache_dir=None, identity="bundle-a", disk_bytes=1 << 20):
    return ContextCache(identity, {"target": Part({"kv": ((2,), "float32")}),
                                   "d#extra": Part({"x": ((), "int64")}, required=False)},
                        max_bytes, B, cache_dir, disk_bytes)


def store(cache, tokens):
    """Store whole blocks of `tokens` whose arrays record the positions (so a test can see what came back)."""
    cache.store(np.asarray(tokens), len(tokens), lambda part, start, stop: {
        "kv": np.stack([np.arange(start, stop)] * 2, 1).astype(np.float32)} if part == "target" else None)


def test_block_keys_are_a_hash_chain():
    c = unit_cache()
    a, b = c.keys(np.arange(10)), c.keys(np.r_[np.arange(8), 0, 0])
    assert len(a) == 2 and a == b  # whole blocks only; the partial block does not count
    assert c.keys(np.r_[99, np.arange(1, 8)])[1] != a[1]  # block 1's key covers block 0's tokens too
    assert unit_cache(identity="bundle-b").keys(np.arange(8)) != a  # another bundle never matches


def test_every_token_of_a_block_is_in_its_key():
    """Prompts that differ in any one token, the first or the last of a block too, share the keys of the blocks
    before it and no key from its block on: a block never restores K/V computed for another token."""
    c = unit_cache()
    tokens = np.arange(3 * B)
    keys = c.keys(tokens)
    for i in range(len(tokens)):
        other = c.keys(np.where(np.arange(len(tokens)) == i, 99, tokens))
        assert other[:i // B] == keys[:i // B]
        assert all(a != b for a, b in zip(other[i // B:], keys[i // B:])), i


def test_lookup_longest_prefix_and_required_parts():
    c = unit_cache()
    store(c, list(range(12)))
    assert len(c.lookup(np.arange(20), 19, ["target"])) == 3
    assert len(c.lookup(np.arange(12), 11, ["target"])) == 2  # the last token is always left to run
    assert len(c.lookup(np.r_[np.arange(6), 50, 51, 8, 9], 9, ["target"])) == 1  # diverges in block 1
    blocks = c.lookup(np.arange(12), 12, ["target", "d#extra"])  # an optional part does not limit the prefix
    assert len(blocks) == 3 and all("d#extra" not in b for b in blocks)
    assert blocks[2]["target"]["kv"][0, 0] == 8


def test_lru_eviction_within_the_byte_budget():
    per_block = B * 2 * 4  # one block's target rows
    c = unit_cache(max_bytes=4 * per_block)
    store(c, [1] * 8)  # chain A: 2 blocks
    store(c, [2] * 8)  # chain B: 2 blocks; the cache is full
    assert c.nbytes == 4 * per_block
    c.lookup(np.array([1] * 9), 9, ["target"])  # A used again: B is now the least recently used
    store(c, [3] * 4)
    assert c.nbytes <= c.max_bytes
    assert len(c.lookup(np.array([1] * 9), 9, ["target"])) == 2
    # B lost its deeper block first: a prefix's first blocks are touched last, so they outlive their children
    assert len(c.lookup(np.array([2] * 9), 9, ["target"])) == 1
    store(c, [4] * 40)  # larger than the whole budget: what is kept stays within it
    assert c.nbytes <= c.max_bytes


def test_a_block_given_more_parts_is_counted_once():
    """A block cached without a drafter's part, then stored again with it (a request with that drafter after one
    without), replaces its old entry in the byte budget: counted twice, the budget evicted blocks it had room for."""
    per_block = B * 2 * 4 + B * 8  # one block's target rows and its int64 extra part
    c = unit_cache(max_bytes=2 * per_block)
    store(c, [1] * 8)
    extra = lambda part, start, stop: {"x": np.arange(start, stop)} if part == "d#extra" else None  # noqa: E731
    c.store(np.array([1] * 8), 8, extra)
    assert all("d#extra" in b for b in c.blocks.values())
    assert c.nbytes == sum(block_bytes(b) for b in c.blocks.values()) == 2 * per_block
    assert len(c.lookup(np.array([1] * 9), 9, ["target", "d#extra"])) == 2


def test_a_cleared_cache_has_its_whole_budget_again():
    """clear() (bench --multi-turn empties the cache between runs) frees the budget with the blocks: a chain that
    fits is kept whole afterwards."""
    per_block = B * 2 * 4
    c = unit_cache(max_bytes=2 * per_block)
    store(c, [1] * 8)
    c.clear()
    assert c.nbytes == 0 and c.lookup(np.array([1] * 9), 9, ["target"]) == []
    store(c, [2] * 8)
    assert len(c.lookup(np.array([2] * 9), 9, ["target"])) == 2


def test_a_chain_over_the_budget_keeps_its_first_blocks(tmp_path):
    """A conversation longer than the memory budget keeps the blocks a lookup can reach, its first ones, whether
    stored or read back from the disk tier (it kept its last ones, unreachable without the first: every later
    turn of a long chat missed the whole history)."""
    per_block = B * 2 * 4
    tokens, follow_up = np.arange(10 * B), np.arange(10 * B + 1)
    memory = unit_cache(max_bytes=4 * per_block)
    store(memory, tokens)
    assert memory.nbytes <= memory.max_bytes
    assert len(memory.lookup(follow_up, len(tokens), ["target"])) == 4
    store(unit_cache(max_bytes=4 * per_block, cache_dir=str(tmp_path)), tokens)
    restarted = unit_cache(max_bytes=4 * per_block, cache_dir=str(tmp_path))  # the disk tier alone holds them
    assert len(restarted.lookup(follow_up, len(tokens), ["target"])) == 10
    assert restarted.nbytes <= restarted.max_bytes and set(restarted.blocks) == set(restarted.keys(tokens)[:4])


def test_disk_tier_round_trip_and_bad_files_ignored(tmp_path):
    store(unit_cache(cache_dir=str(tmp_path)), list(range(8)))
    fresh = unit_cache(cache_dir=str(tmp_path))  # as after a restart: memory empty
    blocks = fresh.lookup(np.arange(9), 9, ["target"])
    assert len(blocks) == 2 and blocks[1]["target"]["kv"][0, 0] == 4
    (folder,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len([f for f in folder.iterdir() if f.suffix == ".npz"]) == 2
    files = [folder / f"{key}.npz" for key in fresh.keys(np.arange(8))]  # block 0's file, block 1's
    files[1].write_bytes(b"not a zip at all")  # corrupt
    with pytest.warns(UserWarning, match="unreadable"):
        assert len(unit_cache(cache_dir=str(tmp_path)).lookup(np.arange(9), 9, ["target"])) == 1
    files[1].write_bytes(files[0].read_bytes())  # a real block under another block's name
    with pytest.warns(UserWarning, match="not the block"):
        assert len(unit_cache(cache_dir=str(tmp_path)).lookup(np.arange(9), 9, ["target"])) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another bundle's cache in the same folder: no match, no warning
        assert unit_cache(cache_dir=str(tmp_path), identity="bundle-b").lookup(np.arange(9), 9, ["target"]) == []


def _npz_member(name: str, shape: str, data: bytes = b"", compress=zipfile.ZIP_STORED) -> bytes:
    """A block file of one .npy member whose header claims `shape` (float32) over `data`."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (118 - len(header)) + b"\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as z:
        z.writestr(name, b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data)
    return buf.getvalue()


# what each damaged file is refused for: a member larger than the layout's array, by its size or its header's
# claim, or of a name it lacks, before any member is read (np.load would allocate what a header claims)
DAMAGE_WARNINGS = {"bomb": "members are not", "stranger": "members are not", "huge": "members are not",
                   "dtype": "arrays do not have"}


@pytest.mark.parametrize("kind", ["npy", "flipped", "header", "huge", "bomb", "stranger", "dtype"])
def test_disk_blocks_of_any_damage_are_ignored(tmp_path, kind):
    """A block file is untrusted: whatever is wrong with it costs that block, with a warning, never the request,
    and its members' sizes are checked before any is read (a small file must not unpack into gigabytes)."""
    store(unit_cache(cache_dir=str(tmp_path)), list(range(8)))
    (folder,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    path = folder / f"{unit_cache().keys(np.arange(8))[1]}.npz"
    if kind == "npy":
        np.save(path.open("wb"), np.zeros(3))
    elif kind == "flipped":  # a compressed copy with a byte flipped inside the deflated data
        with np.load(path) as z:
            buf = io.BytesIO()
            np.savez_compressed(buf, **{n: z[n] for n in z.files})
        damaged = bytearray(buf.getvalue())
        damaged[len(damaged) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))
    elif kind == "header":
        path.write_bytes(_npz_member("target/kv.npy", "(4, 2"))  # its parenthesis never closed
    elif kind == "huge":
        path.write_bytes(_npz_member("target/kv.npy", "(100000000000,)"))
    elif kind == "bomb":  # 64 MiB of zeros deflated to a few hundred KiB
        path.write_bytes(_npz_member("target/kv.npy", "(16777216,)", bytes(64 << 20), zipfile.ZIP_DEFLATED))
    elif kind == "dtype":  # the block's own key and shapes, its rows int32: as many bytes as float32's
        with np.load(path) as z:
            arrays = {n: z[n] for n in z.files}
        np.savez(path, **{**arrays, "target/kv": arrays["target/kv"].astype(np.int32)})
    else:
        path.write_bytes(_npz_member("../../elsewhere.npy", "(4, 2)", bytes(32)))
    with pytest.warns(UserWarning, match=DAMAGE_WARNINGS.get(kind, "unreadable")):
        assert len(unit_cache(cache_dir=str(tmp_path)).lookup(np.arange(9), 9, ["target"])) == 1


def test_disk_tier_removes_what_a_killed_writer_left(tmp_path):
    """A block file under its temporary name, old enough that no live writer owns it, is removed when the disk tier
    opens; a fresh one (a writer at work) and every other file stay."""
    store(unit_cache(cache_dir=str(tmp_path)), list(range(8)))
    (folder,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    old, fresh, other = folder / ".tmp-killed", folder / ".tmp-writing", folder / "notes.txt"
    for f in (old, fresh, other):
        f.write_bytes(b"partial")
    os.utime(old, (0, 0))
    os.utime(other, (0, 0))
    unit_cache(cache_dir=str(tmp_path))
    assert not old.exists() and fresh.exists() and other.exists()
    assert len(list(folder.glob("*.npz"))) == 2


def test_disk_tier_removes_what_a_killed_writer_left_for_another_bundle(tmp_path):
    """A bundle rebuilt since (a new identity) never opens its old folder again: what a killed writer left there is
    removed when any bundle's disk tier opens the cache dir, and only in folders that are the cache's own."""
    store(unit_cache(cache_dir=str(tmp_path), identity="bundle-old"), list(range(8)))
    (old_folder,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    stranger = tmp_path / "not-the-caches"
    stranger.mkdir()
    killed, fresh, strangers = old_folder / ".tmp-killed", old_folder / ".tmp-writing", stranger / ".tmp-killed"
    for f in (killed, fresh, strangers):
        f.write_bytes(b"partial")
    os.utime(killed, (0, 0))
    os.utime(strangers, (0, 0))
    unit_cache(cache_dir=str(tmp_path), identity="bundle-new")
    assert not killed.exists() and fresh.exists() and strangers.exists()
    assert len(list(old_folder.glob("*.npz"))) == 2


def test_disk_tier_within_its_byte_budget(tmp_path):
    store(unit_cache(cache_dir=str(tmp_path)), [1] * 4)
    (folder,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    size = next(f for f in folder.iterdir() if f.suffix == ".npz").stat().st_size
    c = unit_cache(cache_dir=str(tmp_path), disk_bytes=int(2.5 * size))
    store(c, [2] * 4)
    os.utime(folder / f"{c.keys(np.array([1] * 4))[0]}.npz", (1, 1))  # block [1]*4 the least recently used
    store(c, [3] * 4)
    assert c.disk.nbytes <= c.disk.max_bytes and len(list(folder.glob("*.npz"))) == 2
    fresh = unit_cache(cache_dir=str(tmp_path))
    assert fresh.lookup(np.array([1] * 5), 5, ["target"]) == []
    assert len(fresh.lookup(np.array([3] * 5), 5, ["target"])) == 1


def test_a_full_disk_tier_scans_its_folder_once_per_tenth_of_its_budget(tmp_path, monkeypatch):
    """Past EVICT_TO of its budget a scan deletes down to it: every scan reads the whole cache dir, so a tier kept
    exactly at its budget would scan it again at every block it writes after."""
    from speccompile.runtime import context_disk
    store(unit_cache(cache_dir=str(tmp_path)), [1] * 4)
    (folder,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    size = next(f for f in folder.iterdir() if f.suffix == ".npz").stat().st_size
    c = unit_cache(cache_dir=str(tmp_path), disk_bytes=40 * size)
    scans = []
    blocks = context_disk.DiskTier._blocks
    monkeypatch.setattr(context_disk.DiskTier, "_blocks", lambda self: scans.append(1) or blocks(self))
    for i in range(2, 122):
        store(c, [i] * 4)
        assert c.disk.nbytes <= c.disk.max_bytes
    assert 8 <= len(scans) <= 32  # 120 blocks written, a scan per 4 of them (a tenth of the budget), not one per block
    assert len(list(folder.glob("*.npz"))) <= 40


def test_a_failed_write_stops_the_disk_tiers_writes_not_its_reads(tmp_path, monkeypatch):
    """A disk that filled up (or a shared folder mounted read-only) stopped the disk tier altogether: the blocks
    it holds, written by earlier runs or other replicas, were no longer read."""
    import errno
    from speccompile.runtime import context_disk
    store(unit_cache(cache_dir=str(tmp_path)), list(range(8)))  # an earlier run's blocks

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(context_disk, "write_atomically", full)
    c = unit_cache(cache_dir=str(tmp_path), max_bytes=0)  # no memory tier: every hit is the disk's
    with pytest.warns(UserWarning, match="writes no more blocks"):
        store(c, list(range(100, 108)))
    assert len(c.lookup(np.arange(9), 9, ["target"])) == 2  # the earlier run's two blocks, read from disk


@pytest.mark.parametrize("made", ["nothing", "the cache dir"])
def test_a_full_disk_at_load_costs_only_the_disk_tier(tmp_path, monkeypatch, made):
    """A disk too full for a new bundle's folder or index (a rebuilt bundle, a new onnxruntime) turned every load
    with --cache-dir into an error; it costs the disk tier, with a warning, as a full disk does at every write."""
    import errno
    cache_dir = tmp_path / "cache"
    if made == "the cache dir":
        cache_dir.mkdir()

    def failing(code):
        def fail(*_args, **_kwargs):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(os, "mkdir", fail)
        monkeypatch.setattr(os, "makedirs", fail)
    failing(errno.ENOSPC)
    with pytest.warns(UserWarning, match="No space left on device"):
        c = unit_cache(cache_dir=str(cache_dir))
    assert not c.disk.usable and c.disk.nbytes == 0
    store(c, list(range(8)))
    assert len(c.lookup(np.arange(9), 9, ["target"])) == 2  # the memory tier still works
    failing(errno.EACCES)
    with pytest.raises(SpeccompileError, match="Permission denied"):  # any other failure is still an error
        unit_cache(cache_dir=str(cache_dir))


def test_disk_budget_spans_every_bundle_in_the_cache_dir(tmp_path):
    """A rebuilt bundle is a new identity with a folder of its own: the byte budget bounds the whole cache dir, the
    old identity's least recently used blocks going first, and nothing but the cache's own block files is deleted
    (a file of another name in a cache folder, a block-named file in a folder that is not the cache's)."""
    store(unit_cache(cache_dir=str(tmp_path), identity="bundle-old"), [1] * 8)
    (old,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    blocks = list(old.glob("*.npz"))
    size = blocks[0].stat().st_size
    mine = tmp_path / "mine"
    mine.mkdir()
    strangers = [old / "notes.npz", mine / blocks[0].name]
    for f in [*blocks, *strangers]:
        if not f.exists():
            f.write_bytes(bytes(size))
        os.utime(f, (1, 1))  # the least recently used files of the folder
    c = unit_cache(cache_dir=str(tmp_path), identity="bundle-new", disk_bytes=int(2.5 * size))
    store(c, [2] * 8)
    assert not any(f.exists() for f in blocks) and all(f.exists() for f in strangers)
    again = unit_cache(cache_dir=str(tmp_path), identity="bundle-new")
    assert len(again.lookup(np.array([2] * 9), 9, ["target"])) == 2


def _block_file_bytes(tmp_path) -> int:
    """The size of one unit_cache block file."""
    probe = tmp_path / "probe"
    store(unit_cache(cache_dir=str(probe)), [1] * 4)
    return next(probe.glob("*/*.npz")).stat().st_size


def test_replicas_sharing_a_cache_dir_keep_within_its_budget(tmp_path):
    """Replicas opened together on one cache dir see only their own writes between scans of it: each filled it to
    the budget before counting the others' blocks (three replicas held nearly three budgets). Each scans at least
    once per tenth of the budget it writes, so the others' blocks overrun it by no more than that."""
    from speccompile.runtime.context_disk import EVICT_TO
    cache_dir, budget = tmp_path / "cache", 20 * _block_file_bytes(tmp_path)
    replicas = [unit_cache(cache_dir=str(cache_dir), disk_bytes=budget) for _ in range(3)]
    for r, c in enumerate(replicas):
        for i in range(19):
            store(c, [100 * r + i] * 4)
            assert sum(f.stat().st_size for f in cache_dir.glob("*/*.npz")) <= budget * (2 - EVICT_TO)


def test_a_cache_dir_cleared_while_a_process_writes_stays_within_its_budget(tmp_path):
    """The cache dir cleared under a running process (rm -rf): its next write made the bundle's folder again without
    an index, and a scan counts and evicts only blocks in folders whose index is the cache's, so that process's
    blocks grew past the budget for as long as it ran. The index is made again with the folder."""
    import shutil
    cache_dir, budget = tmp_path / "cache", 5 * _block_file_bytes(tmp_path)
    c = unit_cache(cache_dir=str(cache_dir), disk_bytes=budget)
    store(c, [1] * 4)
    shutil.rmtree(cache_dir)
    for i in range(2, 30):
        store(c, [i] * 4)
    assert sum(f.stat().st_size for f in cache_dir.glob("*/*.npz")) <= budget
    assert len(unit_cache(cache_dir=str(cache_dir)).lookup(np.array([29] * 5), 5, ["target"])) == 1


def test_a_chain_every_request_uses_is_evicted_from_disk_last(tmp_path):
    """A prefix every request shares stays in memory, where lookups find it: its block files were never touched
    again, the oldest in the cache dir, and evicted first (its first block too, so a new process restored none
    of it). Every lookup touches them, the first block newest, so a chain no longer used loses its tail first."""
    cache_dir = str(tmp_path / "cache")
    c = unit_cache(cache_dir=cache_dir, disk_bytes=20 * _block_file_bytes(tmp_path))
    chain = np.arange(8 * B)
    store(c, chain)
    for i in range(16):
        store(c, [100 + i] * B)
        assert len(c.lookup(np.r_[chain, 0], len(chain) + 1, ["target"])) == 8  # from memory
    assert len(unit_cache(cache_dir=cache_dir).lookup(np.r_[chain, 0], len(chain) + 1, ["target"])) == 8
    for i in range(16, 32):
        store(c, [100 + i] * B)
    on_disk = [os.path.exists(os.path.join(c.disk.dir, f"{k}.npz")) for k in c.keys(chain)]
    assert 0 < sum(on_disk) < 8 and on_disk == sorted(on_disk, reverse=True), on_disk


def test_a_damaged_block_file_is_closed(tmp_path):
    """A truncated block file (np.load raises on its zip) is ignored and its file closed, not left to the garbage
    collector."""
    store(unit_cache(cache_dir=str(tmp_path)), list(range(8)))
    (folder,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    path = folder / f"{unit_cache().keys(np.arange(8))[1]}.npz"
    path.write_bytes(path.read_bytes()[:40])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert len(unit_cache(cache_dir=str(tmp_path)).lookup(np.arange(9), 9, ["target"])) == 1
        gc.collect()
    assert any("unreadable" in str(w.message) for w in seen)
    assert not [w for w in seen if issubclass(w.category, ResourceWarning)]


def test_blocks_another_process_evicts_are_misses_not_failures(tmp_path, monkeypatch):
    """Processes sharing a cache dir evict each other's block files at any moment: one deleted just after this
    process renamed it into place, or between finding it and opening it, costs that block, silently; the disk
    tier stays on (it was turned off, with a warning that it could not write)."""
    from speccompile.runtime import context_disk
    write = context_disk.write_atomically

    def evicted_at_once(path, *args, **kwargs):
        write(path, *args, **kwargs)
        if path.endswith(".npz"):
            os.unlink(path)
    c = unit_cache(cache_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(context_disk, "write_atomically", evicted_at_once)
        store(c, list(range(8)))
        monkeypatch.setattr(context_disk, "write_atomically", write)
        assert c.disk.usable and c.disk.nbytes == 0
        store(unit_cache(cache_dir=str(tmp_path)), list(range(8)))  # kept on disk this time
        fresh = unit_cache(cache_dir=str(tmp_path))
        assert fresh.disk.nbytes > 0
        opened = context_disk.open_regular
        monkeypatch.setattr(context_disk, "open_regular", lambda path: os.unlink(path) or opened(path))  # found, gone
        assert fresh.lookup(np.arange(9), 9, ["target"]) == [] and fresh.disk.usable


def test_disk_tier_refuses_a_foreign_layout_and_index(tmp_path):
    store(unit_cache(cache_dir=str(tmp_path)), list(range(8)))
    other = ContextCache("bundle-a", {"target": Part({"kv": ((3,), "float32")})}, 1 << 20, B, str(tmp_path))
    with pytest.warns(UserWarning, match="layout"):
        assert other.lookup(np.arange(9), 9, ["target"]) == []
    (folder,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    (folder / "index.json").write_text('{"format": "something else"}')
    with pytest.warns(UserWarning, match="not this bundle's index"):
        c = unit_cache(cache_dir=str(tmp_path))
    assert c.lookup(np.arange(9), 9, ["target"]) == []



def test_disk_tier_never_reads_or_touches_a_file_through_a_link(tmp_path):
    """Block files that are symbolic links to files outside the cache dir are misses: never read, their targets'
    times never touched, and the links replaced by the blocks' own files when the blocks are stored again."""
    cache_dir, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    store(unit_cache(cache_dir=str(cache_dir)), list(range(8)))
    (folder,) = [d for d in cache_dir.iterdir() if d.is_dir()]
    links = sorted(folder.glob("*.npz"))
    for i, link in enumerate(links):
        target = outside / f"{i}.npz"
        link.rename(target)
        os.utime(target, (1, 1))
        link.symlink_to(target)
    c = unit_cache(cache_dir=str(cache_dir))
    with pytest.warns(UserWarning, match="unreadable"):
        assert c.lookup(np.arange(9), 9, ["target"]) == []
    assert all(f.stat().st_mtime == 1 for f in outside.iterdir())
    with pytest.warns(UserWarning, match="unreadable"):  # looked up again before it is stored
        store(c, list(range(8)))
    assert not any(link.is_symlink() for link in links) and len(list(outside.iterdir())) == 2


def test_a_linked_bundle_folder_is_not_used(tmp_path):
    """A bundle's folder in the cache dir that is a link elsewhere: the disk tier is off, with a warning, and
    nothing there is read, written or deleted (a temporary name a killed writer would leave, too)."""
    cache_dir, outside = tmp_path / "cache", tmp_path / "outside"
    store(unit_cache(cache_dir=str(cache_dir)), list(range(8)))
    (folder,) = [d for d in cache_dir.iterdir() if d.is_dir()]
    folder.rename(outside)
    folder.symlink_to(outside)
    stale = outside / ".tmp-not-the-caches"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    before = sorted(f.name for f in outside.iterdir())
    with pytest.warns(UserWarning, match="not a folder of the cache dir"):
        c = unit_cache(cache_dir=str(cache_dir))
    assert c.lookup(np.arange(9), 9, ["target"]) == []
    store(c, list(range(12)))
    assert sorted(f.name for f in outside.iterdir()) == before


def _within(seconds, fn):
    """fn()'s result, or a failure if it has not returned within `seconds` (it runs on a thread of its own)."""
    import threading
    out = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert out, "still waiting"
    return out[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
@pytest.mark.parametrize("where", ["block", "index", "another folder's index"])
def test_a_named_pipe_in_the_cache_dir_is_not_waited_on(tmp_path, where):
    """Opening a FIFO waits for a writer: one in place of a block file or an index is no cache file, and the disk
    tier goes on (or off, for its own index) at once."""
    store(unit_cache(cache_dir=str(tmp_path)), list(range(8)))
    (folder,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    if where == "another folder's index":
        (tmp_path / "other").mkdir()
        fifo = tmp_path / "other" / "index.json"
    else:
        fifo = folder / ("index.json" if where == "index" else f"{unit_cache().keys(np.arange(8))[1]}.npz")
        fifo.unlink()
    os.mkfifo(fifo)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = _within(10, lambda: len(unit_cache(cache_dir=str(tmp_path)).lookup(np.arange(9), 9, ["target"])))
        assert found == {"block": 1, "index": 0}.get(where, 2)
    finally:  # a reader still waiting on the FIFO is let go by a writer's open (none waiting: ENXIO)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_a_folder_under_a_blocks_name_costs_only_that_block(tmp_path):
    """A folder where a block file belongs is not the cache's to delete: that block is not kept on disk, with a
    warning, and the disk tier goes on keeping the others."""
    c = unit_cache(cache_dir=str(tmp_path))
    (folder,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    (folder / f"{c.keys(np.array([1] * 4))[0]}.npz").mkdir()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        store(c, [1] * 4)
    assert any("is a folder" in str(w.message) for w in seen)
    store(c, [2] * 4)
    assert c.disk.usable
    assert len(unit_cache(cache_dir=str(tmp_path)).lookup(np.array([2] * 5), 5, ["target"])) == 1

# ---- through the Generator --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cached(tiny_bundle):
    """The tiny bundle (lookup, layerskip:2, a draft model) with and without the cache."""
    return (speccompile.load(tiny_bundle, threads=1),
            speccompile.load(tiny_bundle, threads=1, context_cache=False))


@pytest.fixture(scope="module")
def mtp_cached(tmp_path_factory):
    torch = pytest.importorskip("torch")  # noqa: F841 (the head's checkpoint is written through safetensors)
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from speccompile.compile.presets import tiny_mtp_head
    from speccompile.compile.sources import load_checkpoint
    d = tmp_path_factory.mktemp("mtp-cache")
    safetensors_numpy.save_file(tiny_mtp_head(load_checkpoint("tiny:llama").config), str(d / "head.safetensors"))
    out = str(d / "bundle")
    build_bundle("tiny:llama", out, drafts=[f"mtp:{d / 'head.safetensors'}"], max_seq_len=256, num_draft=3,
                 progress=quiet)
    return speccompile.load(out, threads=1), speccompile.load(out, threads=1, context_cache=False)


@pytest.fixture(scope="module")
def serial_bundle(tmp_path_factory):
    """A tiny bundle without the batched graph (--max-batch 1, as every model it is not built for): a request runs in
    its caller's own loop, which restores and saves its prefix itself, not through the scheduler."""
    out = str(tmp_path_factory.mktemp("serial-cache") / "bundle")
    build_bundle("tiny:llama", out, drafts=["model:tiny:llama-draft"], max_seq_len=256, num_draft=4, max_batch=1,
                 progress=quiet)
    return out


LOOPS = ["tiny_bundle", "serial_bundle"]  # requests served by the scheduler's shared passes, or in their own loop


def scrub(gen):
    """Overwrite every cache row and feature the last request left (a restore must not rely on them)."""
    rng = np.random.default_rng(0)
    engines = [gen.target] + [d.engine for d in gen.drafters.values() if hasattr(d, "engine")]
    for arr in [a for e in engines for a in (e.cache.key, e.cache.value)] + \
            [d.h for d in gen.drafters.values() if hasattr(d, "h")]:
        arr[:] = rng.standard_normal(arr.shape)


def chat_turns(gen, drafter, turns=3, **kwargs):
    """A chat as token ids: each turn's prompt is the last prompt, its answer and a new message."""
    prompt, results = random_prompts(8)[7] * 3, []
    for turn in range(turns):
        scrub(gen)
        res = gen.generate(prompt, 24, drafter=drafter, **kwargs)
        results.append(res)
        prompt = prompt + res.token_ids + [10 + turn, 11, 12, 13, 14]
    return results


@pytest.mark.parametrize("bundle", LOOPS)
def test_hits_and_misses_counted(bundle, request):
    path = request.getfixturevalue(bundle)
    gen = speccompile.load(path, threads=1)  # an empty cache
    assert (gen.scheduler is None) == (bundle == "serial_bundle")
    prompt = random_prompts(8)[7][:34]  # two whole blocks of 16
    first = gen.generate(prompt, 4, speculate=False).stats
    assert (first["prompt_cache_hit_tokens"], first["prompt_cache_miss_tokens"]) == (0, 34)
    again = gen.generate(prompt, 4, speculate=False).stats
    assert (again["prompt_cache_hit_tokens"], again["prompt_cache_miss_tokens"]) == (32, 2)
    # the last token runs: its logits are needed (restoring it too left a prefill of nothing, which never ended)
    assert gen.context_cache.restore(np.array(prompt[:32]), gen.target.cache) == 16
    exact = gen.generate(prompt[:32], 4, speculate=False).stats
    assert (exact["prompt_cache_hit_tokens"], exact["prompt_cache_miss_tokens"]) == (16, 16)
    assert again["prefill_passes"] == 1
    other = gen.generate([1] + prompt[1:], 4, speculate=False).stats
    assert other["prompt_cache_hit_tokens"] == 0
    disabled = speccompile.load(path, threads=1, context_cache=False)
    assert disabled.generate(prompt, 4).stats["prompt_cache_hit_tokens"] == 0


@pytest.mark.parametrize("bundle", LOOPS)
def test_an_answers_last_token_is_not_cached(bundle, request):
    """A request ends with its last token not yet run (its K/V row holds whatever was there before): the blocks
    saved after its answer end before that token. An answer ending a block exactly would otherwise leave that block
    cached with a stale row, which the next turn restores."""
    path = request.getfixturevalue(bundle)
    gen, plain = speccompile.load(path, threads=1), speccompile.load(path, threads=1, context_cache=False)
    prompt = random_prompts(8)[7][:30]
    scrub(gen)
    answer = gen.generate(prompt, 18, speculate=False).token_ids
    assert len(answer) == 18  # the context is 48 tokens, three whole blocks, its last token never run
    logits, hits = [], []
    for g in (gen, plain):
        scrub(g)
        res = g.generate(prompt + answer + [21, 22], 1, speculate=False, temperature=1.0, seed=0)  # the prefill's
        logits.append(g.target.logits[0].copy())
        hits.append(res.stats["prompt_cache_hit_tokens"])
    assert hits == [32, 0]
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bundle", LOOPS)
def test_a_prompt_is_cached_once_prefilled_though_its_stream_is_dropped(bundle, request):
    """A caller that closes its stream after the first tokens (a client gone) still leaves the prompt's blocks:
    they are saved after its prefill, not only with the answer's at the end."""
    gen = speccompile.load(request.getfixturevalue(bundle), threads=1)
    prompt = random_prompts(8)[7][:32]  # two whole blocks, the last one ending with the prompt
    stream = gen.stream(prompt, 20, speculate=False)
    next(stream)
    stream.close()
    assert gen.generate(prompt + [5], 2, speculate=False).stats["prompt_cache_hit_tokens"] == 32


@pytest.mark.parametrize("bundle", LOOPS)
def test_a_stream_cancelled_before_its_first_pass_caches_nothing(bundle, request):
    """A request in its caller's own loop (typical acceptance; any request without the batched graph) cancelled
    before its first pass ran nothing: the target's cache still held the previous request's K/V, and saving them
    under this prompt's blocks made the next request with the prompt restore another text's keys and values."""
    gen = speccompile.load(request.getfixturevalue(bundle), threads=1)
    own_loop = dict(temperature=0.7, acceptance="typical", seed=0)
    first, second = random_prompts(8)[6][:40], random_prompts(8)[7][:40]
    gen.generate(first, 8, **own_loop)
    stream = gen.stream(second, 8, **own_loop)
    stream.cancel()
    assert drain(stream).finish_reason == "cancelled"
    assert gen.generate(second, 2, speculate=False).stats["prompt_cache_hit_tokens"] == 0


def test_chat_with_the_cache_equals_without_in_its_own_loop(serial_bundle):
    gen, plain = speccompile.load(serial_bundle, threads=1), speccompile.load(serial_bundle, threads=1,
                                                                             context_cache=False)
    for kw in ({}, dict(temperature=0.9, seed=3)):
        with_cache, without = chat_turns(gen, "model", **kw), chat_turns(plain, "model", **kw)
        assert [r.token_ids for r in with_cache] == [r.token_ids for r in without]
        assert with_cache[-1].stats["prompt_cache_hit_tokens"] > with_cache[0].stats["prompt_tokens"]


@pytest.mark.parametrize("drafter", ["lookup", "layerskip:2", "model"])
def test_chat_with_the_cache_equals_without(cached, drafter):
    with_cache, without = chat_turns(cached[0], drafter), chat_turns(cached[1], drafter)
    assert [r.token_ids for r in with_cache] == [r.token_ids for r in without]
    for prev, res in zip(with_cache, with_cache[1:]):  # each turn hits the history: last prompt and answer
        history = prev.stats["prompt_tokens"] + len(prev.token_ids)
        assert res.stats["prompt_cache_hit_tokens"] >= (history - 1) // 16 * 16 - 16
        assert res.stats["prompt_cache_hit_tokens"] + res.stats["prompt_cache_miss_tokens"] == \
            res.stats["prompt_tokens"]


def test_a_restored_prefix_gives_the_logits_of_a_full_prefill(cached):
    """The tiny random model's greedy answers hardly depend on the context, so check the prefill's own logits."""
    gen, plain = cached
    prompt = random_prompts(8)[6] * 3
    answer = gen.generate(prompt, 20, drafter="model").token_ids
    follow_up = prompt + answer + [21, 22, 23]
    logits, hits = [], []
    for g in (gen, plain):
        scrub(g)
        res = g.generate(follow_up, 1, drafter="model", temperature=1.0, seed=0)  # one pass: the prefill's logits
        logits.append(g.target.logits[0].copy())
        hits.append(res.stats["prompt_cache_hit_tokens"])
    assert hits[0] >= len(prompt) + len(answer) - 16 and hits[1] == 0
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("drafter", ["model", "layerskip:2"])
def test_sampled_chat_with_the_cache_equals_without(cached, drafter):
    kw = dict(temperature=0.9, seed=3)
    assert [r.token_ids for r in chat_turns(cached[0], drafter, **kw)] == \
        [r.token_ids for r in chat_turns(cached[1], drafter, **kw)]


def restored_drafts(gens, name):
    """A drafter's draft distributions for the first proposal of a chat's next turn: with its state restored from
    the cache (the first Generator) and rebuilt from the tokens alone (the second, without a cache)."""
    prompt = random_prompts(8)[6] * 3
    context = np.array(prompt + gens[0].generate(prompt, 20, drafter=name).token_ids + [9, 10], np.int64)
    qs = []
    for gen in gens:
        scrub(gen)
        hit = gen.generate(context[:-1].tolist(), 1, drafter=name).stats["prompt_cache_hit_tokens"]  # the prefill
        drafter = gen.drafters[name]
        if gen.context_cache:  # its own cache too, whole (an MTP head's but for the pair past the prefix)
            assert hit >= len(prompt) and drafter.engine.cache.length == hit - (name == "mtp")
        qs.append(drafter.propose(context, 3, SamplingParams(temperature=1.0), np.random.default_rng(0)).q)
    return qs


@pytest.mark.parametrize("name", ["model", "layerskip:2"])
def test_draft_model_kv_restored(cached, name):
    with_cache, without = restored_drafts(cached, name)
    np.testing.assert_allclose(with_cache, without, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tree", [None, "dynamic:2+lookup:3"])
def test_mtp_chat_with_the_cache_equals_without(mtp_cached, tree):
    for kw in ({}, dict(temperature=0.8, seed=5)):
        with_cache, without = chat_turns(mtp_cached[0], "mtp", tree=tree, **kw), \
            chat_turns(mtp_cached[1], "mtp", tree=tree, **kw)
        assert [r.token_ids for r in with_cache] == [r.token_ids for r in without]
        assert with_cache[-1].stats["prompt_cache_hit_tokens"] > with_cache[0].stats["prompt_tokens"]


def test_a_prefix_without_the_heads_features_is_a_miss(mtp_cached):
    gen = mtp_cached[0]
    prompt = random_prompts(8)[4] * 4
    assert gen.generate(prompt, 4, speculate=False).stats["prompt_cache_hit_tokens"] == 0
    # cached without the head's features, which it cannot rebuild: prefilled in full (and the features stored)
    assert gen.generate(prompt, 4, drafter="mtp").stats["prompt_cache_hit_tokens"] == 0
    assert gen.generate(prompt, 4, drafter="mtp").stats["prompt_cache_hit_tokens"] > 0


def test_mtp_head_restored_drafts_as_rebuilt(mtp_cached):
    with_cache, without = restored_drafts(mtp_cached, "mtp")
    np.testing.assert_allclose(with_cache, without, rtol=1e-4, atol=1e-5)


def test_mtp_head_blocks_hold_only_their_own_tokens(mtp_cached):
    """The head's slot t pairs h_t with the token after it. A block saved by one request must not carry the pair
    of its last position with that request's next token: another prompt with the same block goes on otherwise."""
    gen, plain = mtp_cached
    rng = np.random.default_rng(1)
    shared = rng.integers(3, 300, 16).tolist()  # one whole block
    first, second = (shared + rng.integers(3, 300, 24).tolist() for _ in range(2))
    assert first[16] != second[16]
    gen.generate(first, 12, drafter="mtp")  # saves block 0, after which `first` went on with first[16]
    context = np.array(second + gen.generate(second, 12, drafter="mtp").token_ids + [5, 6], np.int64)
    qs = []
    for g in (gen, plain):
        scrub(g)
        g.generate(context[:-1].tolist(), 1, drafter="mtp")
        qs.append(g.drafters["mtp"].propose(context, 3, SamplingParams(temperature=1.0), np.random.default_rng(0)).q)
    np.testing.assert_allclose(qs[0], qs[1], rtol=1e-4, atol=1e-5)


def test_mtp_features_and_head_kv_restored(mtp_cached):
    gen = mtp_cached[0]
    prompt = random_prompts(8)[5] * 4
    res = gen.generate(prompt, 20, drafter="mtp")
    head = gen.drafters["mtp"]
    want = head.h[:len(prompt)].copy()
    head.reset()
    head.h[:] = 0
    hit = gen.context_cache.restore(np.array(prompt + res.token_ids + [9], np.int64), gen.target.cache, head)
    assert hit >= len(prompt) and head.known == hit
    np.testing.assert_array_equal(head.h[:len(prompt)], want)
    assert head.engine.cache.length == hit - 1  # its own K/V too, but for the pair that reaches past the prefix


def test_bench_multi_turn(tiny_bundle, tmp_path):
    import json
    from click.testing import CliRunner
    from speccompile.cli import main
    questions = [{"question_id": 1, "category": "summarization", "turns": ["Summarize: " + "the cat sat. " * 8]},
                 {"question_id": 2, "category": "qa", "turns": ["Not a long first message."]}]
    dataset, out = tmp_path / "q.jsonl", tmp_path / "mt.json"
    dataset.write_text("".join(json.dumps(q) + "\n" for q in questions))
    r = CliRunner().invoke(main, ["bench", tiny_bundle, "--multi-turn", "3", "--dataset", str(dataset), "--limit", "2",
                                  "--max-new-tokens", "8", "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert len(doc["conversations"]) == 1  # only the summarization question is of a long-message category
    first, second, third = doc["turns"]
    assert first["hit_tokens"] == 0 and second["hit_tokens"] > 0.5 * second["prompt_tokens"]
    assert third["hit_tokens"] > second["hit_tokens"] and all(t["identical"] for t in doc["turns"])
    assert "speedup" in r.output


def test_bench_multi_turn_skips_a_chat_whose_later_turn_would_not_fit(tiny_bundle, tmp_path):
    """A question whose second turn is long: its first message fits with room for the answers and a follow-up, its
    second turn's prompt does not. It is passed over for one that fits (it was picked, and the run failed at its
    second turn with a context-length error)."""
    import json
    from click.testing import CliRunner
    from speccompile.cli import main
    long_second = {"question_id": 1, "category": "summarization",
                   "turns": ["Summarize: " + "the cat sat. " * 8, "Why? " + "the cat sat. " * 40]}
    short = {"question_id": 2, "category": "summarization", "turns": ["Summarize: the cat sat.", "Why?"]}
    dataset, out = tmp_path / "q.jsonl", tmp_path / "mt.json"
    dataset.write_text("".join(json.dumps(q) + "\n" for q in (long_second, short)))
    r = CliRunner().invoke(main, ["bench", tiny_bundle, "--multi-turn", "2", "--dataset", str(dataset), "--limit", "1",
                                  "--max-new-tokens", "8", "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert len(doc["conversations"]) == 1 and len(doc["turns"]) == 2
    assert doc["turns"][0]["prompt_tokens"] < 40  # the short question's, not the long first message's


@pytest.fixture(scope="module")
def eagle3_cached(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors.numpy")
    from speccompile.compile.sources import load_checkpoint
    from test_eagle import eagle3_config, eagle3_head, write_head
    d = tmp_path_factory.mktemp("eagle3-cache")
    target = load_checkpoint("tiny:llama")
    head = write_head(d / "head", eagle3_head(target, repeat=True), eagle3_config(target))
    out = str(d / "bundle")
    build_bundle("tiny:llama", out, drafts=[f"eagle3:{head}"], max_seq_len=256, num_draft=3, progress=quiet)
    return speccompile.load(out, threads=1), speccompile.load(out, threads=1, context_cache=False)


def test_eagle3_chat_with_the_cache_equals_without(eagle3_cached):
    """An EAGLE-3 head keeps its fused features (the fc's output) per position: restored as they were observed."""
    gen, plain = eagle3_cached
    name = gen.drafter_names[0]
    for kw in ({}, dict(temperature=0.8, seed=7)):
        with_cache, without = chat_turns(gen, name, **kw), chat_turns(plain, name, **kw)
        assert [r.token_ids for r in with_cache] == [r.token_ids for r in without]
        assert with_cache[-1].stats["prompt_cache_hit_tokens"] > with_cache[0].stats["prompt_tokens"]
    head = gen.drafters[name]
    context = np.array(random_prompts(8)[7] * 3, np.int64)
    gen.generate(context.tolist(), 4, drafter=name)
    want = head.h[:len(context)].copy()
    head.reset()
    head.h[:] = 0
    hit = gen.context_cache.restore(context, gen.target.cache, head)
    assert hit > 0 and np.array_equal(head.h[:hit], want[:hit])


def test_cli_cache_dir_survives_a_restart(tiny_bundle, tmp_path):
    import json
    from click.testing import CliRunner
    from speccompile.cli import main

    def hits(*flags):
        r = CliRunner().invoke(main, ["generate", tiny_bundle, "a long enough prompt to fill two cache blocks, at least",
                                      "--max-new-tokens", "4", "--threads", "1", "--json", *flags])
        assert r.exit_code == 0, r.output
        return json.loads(r.output.strip().splitlines()[-1])["stats"]["prompt_cache_hit_tokens"]

    cache_dir = str(tmp_path / "cache")
    assert hits("--cache-dir", cache_dir) == 0
    assert hits("--cache-dir", cache_dir) > 0  # a new process: found on disk
    assert hits("--no-context-cache") == 0  # no cache at all (beside --cache-dir it is refused: test_cli)
    assert hits() == 0  # memory only: nothing from before


def test_medusa_chat_with_the_cache_equals_without(tmp_path):
    """Medusa heads read only the hidden state of the last context token, which the prefill always runs: no state
    to keep, and the output is the same."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from speccompile.compile.sources import load_checkpoint
    from test_mtp import medusa_heads
    safetensors_numpy.save_file(medusa_heads(load_checkpoint("tiny:llama").config, repeat_last=True,
                                             prefix="medusa_head."), str(tmp_path / "m.safetensors"))
    out = str(tmp_path / "b")
    build_bundle("tiny:llama", out, drafts=[f"medusa:{tmp_path / 'm.safetensors'}"], max_seq_len=256, num_draft=3,
                 progress=quiet)
    gen, plain = speccompile.load(out, threads=1), speccompile.load(out, threads=1, context_cache=False)
    assert gen.drafters["medusa"].state_parts() == {}
    for kw in ({}, dict(temperature=0.8, seed=2)):
        with_cache = chat_turns(gen, "medusa", **kw)
        assert [r.token_ids for r in with_cache] == [r.token_ids for r in chat_turns(plain, "medusa", **kw)]
        assert with_cache[-1].stats["prompt_cache_hit_tokens"] > 0


def test_a_server_refuses_a_cache_dir_inside_the_bundle(tiny_bundle, tmp_path):
    """`serve` loads through Generator.load, not speccompile.load, which alone checked: a --cache-dir inside the
    bundle wrote files its manifest does not list, and every later load of the bundle failed its check."""
    import shutil
    from speccompile.runtime.generator import Generator
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    with pytest.raises(SpeccompileError, match="inside the bundle"):
        Generator.load(str(bundle), threads=1, cache_dir=str(bundle / "cache"))
    assert not (bundle / "cache").exists()
    speccompile.load(str(bundle), threads=1)


def test_a_cache_dir_is_refused_where_the_kv_caches_live_on_a_device(tiny_bundle, tmp_path, monkeypatch):
    """Device caches (the device code path, run here with cpu OrtValues) go without the context cache, whose
    blocks are copied through host memory: a --cache-dir would keep nothing, so it is one clear error rather
    than an option silently ignored."""
    from speccompile.runtime.engine import Engine
    monkeypatch.setattr(Engine, "resident_on_cpu", True)
    assert speccompile.load(tiny_bundle, threads=1).context_cache is None
    with pytest.raises(SpeccompileError, match="^cache_dir=.*drop cache_dir$"):
        speccompile.load(tiny_bundle, threads=1, cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_a_cache_dir_shared_by_another_kind_of_cpu_restores_nothing(cached, tmp_path, monkeypatch):
    """Kernels pick their paths by the CPU's instruction sets, and their sums round differently: K/V that another
    kind of machine wrote into a shared --cache-dir is never restored, while the same kind's is."""
    from speccompile.runtime import context_cache
    prompt = random_prompts(8)[7][:34]
    speccompile.load(cached[0].bundle_dir, threads=1, cache_dir=str(tmp_path)).generate(prompt, 2, speculate=False)
    same = speccompile.load(cached[0].bundle_dir, threads=1, cache_dir=str(tmp_path))
    assert same.generate(prompt, 2, speculate=False).stats["prompt_cache_hit_tokens"] == 32  # from the disk tier
    other_cpu = {**context_cache.cpu_identity(), "model": "another CPU"}
    monkeypatch.setattr(context_cache, "cpu_identity", lambda: other_cpu)
    other = speccompile.load(cached[0].bundle_dir, threads=1, cache_dir=str(tmp_path))
    assert other.generate(prompt, 2, speculate=False).stats["prompt_cache_hit_tokens"] == 0
