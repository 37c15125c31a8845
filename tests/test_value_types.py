"""Values of other types than the plain Python ones, as a library user passes them (from numpy, JSON, a config
file): a numpy scalar or a numpy string works exactly as the plain value it holds, and a value of the wrong type
is one SpeccompileError naming the keyword, never a TypeError or ValueError from deep inside."""
import warnings

import numpy as np
import pytest

import speccompile
from speccompile.errors import SpeccompileError
from speccompile.runtime.sampling import SamplingParams

REPEATING = [1, 5, 9, 1, 5, 9, 1, 5]  # prompt lookup finds its continuation, so drafts are proposed and checked

# (numpy keywords, the plain keywords they hold): each pair decodes alike
AS_PLAIN = {
    "num_draft uint64 with lookup": (dict(drafter="lookup", num_draft=np.uint64(4)),
                                     dict(drafter="lookup", num_draft=4)),
    "num_draft uint32 with a draft model": (dict(drafter="model", num_draft=np.uint32(3)),
                                            dict(drafter="model", num_draft=3)),
    "top_k uint64 with top_p": (dict(temperature=1.5, seed=1, top_p=0.9, top_k=np.uint64(5)),
                                dict(temperature=1.5, seed=1, top_p=0.9, top_k=5)),
    "top_k uint8 with top_p": (dict(temperature=1.5, seed=1, top_p=0.9, top_k=np.uint8(5)),
                               dict(temperature=1.5, seed=1, top_p=0.9, top_k=5)),
    "top_k uint32 with typical acceptance": (
        dict(temperature=1.5, seed=2, top_k=np.uint32(5), acceptance="typical", drafter="lookup"),
        dict(temperature=1.5, seed=2, top_k=5, acceptance="typical", drafter="lookup")),
    "seed uint64 at its top": (dict(temperature=1.0, seed=np.uint64(2**64 - 1)), dict(temperature=1.0, seed=2**64 - 1)),
}


@pytest.mark.parametrize("numpy_kw,plain_kw", AS_PLAIN.values(), ids=AS_PLAIN.keys())
def test_numpy_scalars_decode_as_the_plain_values_they_hold(tiny_generator, numpy_kw, plain_kw):
    """An unsigned numpy num_draft turned the lookup drafter's index sums into floats (a TypeError slicing the
    context); an unsigned top_k wrapped around when negated for np.partition (an OverflowError, a ValueError, or
    with uint8 silently another distribution)."""
    g = tiny_generator
    got = g.generate(REPEATING, 12, chat=False, **numpy_kw)
    assert got.token_ids == g.generate(REPEATING, 12, chat=False, **plain_kw).token_ids


def test_sampling_params_hold_plain_numbers():
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.uint64(5), seed=np.int8(7))
    assert (type(p.temperature), type(p.top_k), type(p.seed)) == (float, int, int)
    assert (p.top_k, p.seed) == (5, 7)


def test_a_float16_temperature_is_compared_without_overflow():
    """Compared with the cap as a float16, the cap overflowed to inf: a RuntimeWarning at every call (an error
    under -W error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SamplingParams(temperature=np.float16(0.5)).temperature == 0.5


def test_an_acceptance_that_is_no_text_is_refused_by_name():
    """An array was compared by element with the names of the rules: a ValueError (ambiguous truth value)."""
    with pytest.raises(SpeccompileError, match="acceptance must be one of exact, typical"):
        SamplingParams(temperature=0.5, acceptance=np.array(["exact", "typical"]))


@pytest.mark.parametrize("device", [["cpu"], np.array("cpu"), {"cpu": 1}], ids=repr)
def test_a_device_of_the_wrong_type_is_refused_by_name(tiny_bundle, device):
    """A list or an array was looked up among the device names: a TypeError (unhashable type)."""
    with pytest.raises(SpeccompileError) as refusal:
        speccompile.load(tiny_bundle, threads=1, verify=False, device=device)
    assert str(refusal.value).startswith(f"device={device!r}: no such device; choose from cpu, cuda, tensorrt")
    assert refusal.value.cli_message().startswith("--device ")


def test_numpy_folders_load_as_plain_ones(tiny_bundle, tmp_path):
    """A numpy string's folder was listed by os.scandir in bytes: a TypeError joining them to the str path."""
    g = speccompile.load(np.str_(tiny_bundle), threads=1, cache_dir=np.str_(tmp_path / "contexts"))
    assert g.generate(REPEATING, 6, chat=False).token_ids
    assert (tmp_path / "contexts").is_dir()


def test_a_folder_listed_in_bytes_is_refused_by_name(tiny_bundle):
    """A path-like object whose path is bytes (os.scandir of a bytes folder) was read as the folder "b'...'":
    "bundle not found" for a bundle that is there. Refused as bytes are."""
    import os
    parent, name = os.path.split(os.path.abspath(tiny_bundle))
    listed = next(e for e in os.scandir(os.fsencode(parent)) if e.name == os.fsencode(name))
    with pytest.raises(SpeccompileError, match="^load: expected a bundle's folder"):
        speccompile.load(listed, threads=1)


def test_a_numpy_thread_count_is_measured_as_a_plain_one(tiny_bundle, tmp_path, monkeypatch):
    """A numpy thread count reached the cost model's JSON file: a TypeError at the first adaptive tree."""
    monkeypatch.setenv("SPECCOMPILE_CACHE", str(tmp_path))
    g = speccompile.load(tiny_bundle, threads=np.int32(1))
    assert g.generate(REPEATING, 6, chat=False, drafter="lookup", tree="adaptive").token_ids
    assert list((tmp_path / "cost").glob("*-t1.json"))
