"""What a load takes in memory: stated by `inspect` and the build, and refused when it exceeds what is available."""
import warnings

import pytest
from click.testing import CliRunner

import speccompile
from speccompile.cli import main
from speccompile.errors import BundleError
from speccompile.format.bundle import read_manifest
from speccompile.format.memory import load_memory
from speccompile.runtime import kv_cache


def test_the_stated_kv_bytes_are_what_a_load_allocates_at_most(tiny_bundle, tiny_generator):
    """The batched cache's slots (the target's among them) and each drafter model's cache once per slot (the
    scheduler forks a drafter per slot), against the caches the loaded Generator holds."""
    need = load_memory(read_manifest(tiny_bundle, verify_hashes=False))
    slots = tiny_generator.scheduler.cache.batch
    drafters = sum(d.engine.cache.nbytes for d in tiny_generator.drafters.values() if hasattr(d, "engine"))
    assert need["slots"] == slots > 1
    assert need["kv"] == tiny_generator.scheduler.cache.nbytes + slots * drafters


def test_the_stated_weights_count_each_session_that_holds_a_copy(tiny_bundle):
    """The target's session and the batched graph's each hold the target's matrices; the draft model's are held
    once per slot, and once more by its batched form (the slots' shared catch-ups); the early exit maps the target's
    file, its instances and its batched form sharing the pages: once."""
    m = read_manifest(tiny_bundle, verify_hashes=False)
    held = {name: sum(m["weights"][f][t]["length"] for f in e["weights"] for t in e["initializers"])
            for name, e in m["models"].items()}
    early_exit = next(d["model"] for d in m["drafters"] if d["kind"] == "layerskip")
    draft = next(d["model"] for d in m["drafters"] if d["kind"] == "model")
    need = load_memory(m)
    assert need["weights"] == (held["target"] + held["target_batch"] + need["slots"] * held[draft]
                               + held[f"{draft}_batch"] + held[early_exit])


def test_inspect_states_the_memory_a_load_takes(tiny_bundle):
    need = load_memory(read_manifest(tiny_bundle, verify_hashes=False))
    r = CliRunner().invoke(main, ["inspect", tiny_bundle, "--no-verify"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("memory"))
    assert f"up to {(need['weights'] + need['kv']) / 2**20:.1f} MiB" in line
    assert f"KV caches {need['kv'] / 2**20:.1f} MiB at the full context x {need['slots']} sequence slots" in line


def test_a_load_that_cannot_fit_is_refused_naming_its_size_and_the_options(tiny_bundle, monkeypatch):
    """One sequence at the full context that does not fit is one error naming its size and the option to lower;
    one that fits loads, with a warning where every sequence slot in use would not."""
    m = read_manifest(tiny_bundle, verify_hashes=False)
    one, every = load_memory(m, slots=1), load_memory(m)
    assert one["weights"] + one["kv"] < every["weights"] + every["kv"]
    monkeypatch.setattr(kv_cache, "available_memory", lambda: one["weights"] + one["kv"] - 1)
    with pytest.raises(BundleError, match=r"one sequence .* takes up to .* GiB .*--max-seq-len"):
        speccompile.load(tiny_bundle, threads=1)
    r = CliRunner().invoke(main, ["generate", tiny_bundle, "hi", "--max-new-tokens", "2"])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "--max-seq-len" in r.output, r.output
    monkeypatch.setattr(kv_cache, "available_memory", lambda: one["weights"] + one["kv"])  # one sequence fits
    with pytest.warns(UserWarning, match=f"{every['slots']} sequences sharing passes .* --max-batch"):
        assert speccompile.load(tiny_bundle, threads=1).scheduler is not None
    monkeypatch.setattr(kv_cache, "available_memory", lambda: every["weights"] + every["kv"])  # all slots fit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        speccompile.load(tiny_bundle, threads=1)


def test_a_load_whose_weights_alone_cannot_fit_is_not_told_to_shorten_its_context(tiny_bundle, monkeypatch):
    """A smaller --max-seq-len shrinks only the KV caches: where the weights alone exceed the memory available, the
    error named it as the remedy all the same."""
    one = load_memory(read_manifest(tiny_bundle, verify_hashes=False), slots=1)
    monkeypatch.setattr(kv_cache, "available_memory", lambda: one["weights"] - 1)
    with pytest.raises(BundleError, match=r"weights alone take more.*--weights int8 or int4") as refused:
        speccompile.load(tiny_bundle, threads=1)
    assert "--max-seq-len" not in str(refused.value)


def test_available_memory_reads_this_machine():
    free = kv_cache.available_memory()
    assert free is None or 0 < free < 1 << 50


def test_build_states_the_memory_a_load_takes(tmp_path):
    from speccompile.compile.driver import build_bundle
    lines = []
    manifest = build_bundle("tiny:llama", str(tmp_path / "b"), drafts=["lookup"], max_seq_len=64, max_batch=2,
                            progress=lines.append)
    need = load_memory(manifest)
    assert need["slots"] == 2
    assert any(x.strip().startswith(f"memory: up to {(need['weights'] + need['kv']) / 2**20:.1f} MiB")
               for x in lines), lines


def _write(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def test_a_containers_memory_limit_is_read_where_its_cgroup_says(tmp_path):
    """cgroup v2 in the process's own (nested) folder before the root's, and cgroup v1's files: a container's limit
    was read only at the v2 root, so in a Kubernetes pod or on a v1 host a load that cannot fit was let through."""
    root, own = tmp_path / "cgroup", tmp_path / "self_cgroup"
    own.write_text("0::/kubepods/pod1\n")
    _write(root, memory_max="max", memory_current="1000")
    _write(root / "kubepods" / "pod1", memory_max="5000", memory_current="1200")
    assert kv_cache.cgroup_room(str(root), str(own)) == 3800
    own.write_text("0::/\n")
    assert kv_cache.cgroup_room(str(root), str(own)) is None  # the namespace's root: no limit
    v1, none = tmp_path / "v1", tmp_path / "absent"
    _write(v1 / "memory", **{"memory_limit_in_bytes": "8000", "memory_usage_in_bytes": "3000"})
    assert kv_cache.cgroup_room(str(v1), str(none)) == 5000
    _write(v1 / "memory", **{"memory_limit_in_bytes": str(2**63 - 4096)})  # v1 without a limit
    assert kv_cache.cgroup_room(str(v1), str(none)) is None
