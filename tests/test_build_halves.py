"""The build halves of the drafter kinds (speccompile/compile/drafters/): one per kind of the table, each returning
its part of the bundle without writing into the target it is shown."""
import numpy as np
import pytest

from speccompile.compile.drafters import build_half
from speccompile.compile.drafters.base import BuildOptions, DrafterBuild, TargetBuild
from speccompile.compile.driver import target_features
from speccompile.compile.weights.decoder import lower_weights
from speccompile.compile.presets import tiny_mtp_head
from speccompile.compile.sources import load_checkpoint
from speccompile.errors import SpeccompileError
from speccompile.format.drafter_kinds import KINDS, DraftSpec

from conftest import quiet

safetensors_numpy = pytest.importorskip("safetensors.numpy")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_has_a_build_half(kind):
    assert callable(build_half(kind).build)


def test_build_halves_leave_the_target_as_they_found_it(tmp_path):
    from test_eagle import eagle1_head, eagle3_config, eagle3_head, write_head
    from test_mtp import medusa_heads
    target = load_checkpoint("tiny:llama")
    safetensors_numpy.save_file(tiny_mtp_head(target.config), str(tmp_path / "mtp.safetensors"))
    safetensors_numpy.save_file(medusa_heads(target.config, K=2), str(tmp_path / "medusa.safetensors"))
    e1 = write_head(tmp_path / "e1", eagle1_head(target))
    e3 = write_head(tmp_path / "e3", eagle3_head(target), eagle3_config(target))
    specs = [DraftSpec.parse(s) for s in ("lookup:5", "layerskip:2", "model:tiny:llama-draft", f"eagle:{e1}",
                                          f"mtp:{tmp_path / 'mtp.safetensors'}", f"eagle3:{e3}",
                                          f"medusa:{tmp_path / 'medusa.safetensors'}")]
    opts = BuildOptions(max_seq_len=64, attention="ort")  # as the driver hands the halves a lowering, never auto
    weights = lower_weights(target.config, target.tensors, opts.max_seq_len)
    before = {k: v.copy() for k, v in weights.items()}
    features = target_features(specs, target.config)
    assert features == [1, 2, 4, "norm"]  # EAGLE-3's layers ascending, then EAGLE-1's final norm
    view = TargetBuild(target, weights, opts, features, quiet)
    for spec in specs:
        built = build_half(spec.kind).build(spec, view)
        assert isinstance(built, DrafterBuild)
        assert set(built.graphs) == set(built.models)
        assert all(f in built.weights or f == "target.bin" for g, files in built.graphs.values() for f in files)
    assert set(weights) == set(before) and all(np.array_equal(weights[k], before[k]) for k in before)


def test_numbered_drafts_are_named_as_written_plainly():
    """layerskip:03 is layerskip:3 (the name generate --drafter finds it by); digits of other scripts, which
    str.isdigit takes, are refused as the tree spec's are."""
    assert DraftSpec.parse("layerskip:03").name == "layerskip:3"
    assert DraftSpec.parse("lookup:04") == DraftSpec("lookup", "4")
    for bad in ("layerskip:٣", "lookup:٣", "layerskip:²", "layerskip: 3", "lookup:+2"):
        with pytest.raises(SpeccompileError, match="whole number"):
            DraftSpec.parse(bad)


@pytest.mark.parametrize("spec, says", [("mtp:", "nothing after the colon"), ("lookup:", "nothing after the colon"),
                                        ("none:3", "none takes no argument")])
def test_a_colon_with_nothing_after_it_is_refused(spec, says):
    """"mtp:$HEAD" with HEAD unset was bare mtp, the shipped head, and "none:3" was none: not what was written."""
    with pytest.raises(SpeccompileError, match=says):
        DraftSpec.parse(spec)
