"""FP8 checkpoints as the hub ships them (DeepSeek-V3/R1, Qwen3-*-FP8): float8 e4m3 weights with per-block
`weight_scale_inv`, widened at load time; the bundle then matches transformers run on the dequantized weights."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from speccompile.compile.driver import build_bundle  # noqa: E402
from speccompile.compile.fp8 import E4M3  # noqa: E402
from speccompile.format.bundle import read_manifest  # noqa: E402
from speccompile.runtime.engine import Engine  # noqa: E402

from conftest import quiet  # noqa: E402
from models_util import edit_config, reference_logits, write_checkpoint  # noqa: E402
from test_errors import assert_cli_error, cli  # noqa: E402

BLOCK = 32


def test_e4m3_table_is_torchs():
    assert np.array_equal(E4M3, torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy(),
                          equal_nan=True)


def _to_fp8(tmp_path, case):
    """Write CASES[case] and store it as FP8 (_quantize_dir); the torch model gets the dequantized weights, so it
    is the reference."""
    model = write_checkpoint(case, str(tmp_path / "ck"))
    return model, _quantize_dir(str(tmp_path / "ck"), model)


def _quantize_dir(ck, model=None):
    """Store every safetensors file's projection matrices as FP8 with block scales, as the hub's FP8 checkpoints
    do (and copy the dequantized weights into `model`); returns the first file's tensors."""
    import glob
    from safetensors.torch import load_file, save_file
    first = None
    for path in sorted(glob.glob(f"{ck}/*.safetensors")):
        tensors = load_file(path)
        for name in [n for n in tensors if n.endswith("proj.weight") and tensors[n].ndim == 2]:
            w = tensors[name].float()
            rows, cols = -(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK)
            blocks = torch.nn.functional.pad(w, (0, cols * BLOCK - w.shape[1], 0, rows * BLOCK - w.shape[0]))
            scale = blocks.reshape(rows, BLOCK, cols, BLOCK).abs().amax((1, 3)).clamp(min=1e-12) / 448.0
            full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:w.shape[0], :w.shape[1]]
            q = (w / full).to(torch.float8_e4m3fn)
            tensors[name], tensors[name + "_scale_inv"] = q, scale
            if model is not None and path.endswith("model.safetensors"):
                model.get_parameter(name).data.copy_(q.float() * full)
        save_file(tensors, path)
        first = first or tensors
    edit_config(ck, lambda c: c.update(quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}))
    return first


def test_fp8_checkpoint_matches_transformers_on_its_dequantized_weights(tmp_path):
    model, _ = _to_fp8(tmp_path, "qwen3")
    out = str(tmp_path / "b")
    build_bundle(str(tmp_path / "ck"), out, drafts=["none"], max_seq_len=128, progress=quiet)
    eng = Engine(out, read_manifest(out)["models"]["target"], threads=1, max_rows=40)
    ids = np.random.default_rng(3).integers(3, 384, 40)
    logits, _ = eng.forward(ids, rows=np.arange(40))
    assert np.abs(logits - reference_logits(model, ids)).max() < 1e-4


def test_fp8_tensor_without_its_scales_is_one_error_line(tmp_path):
    from safetensors.torch import save_file
    _, tensors = _to_fp8(tmp_path, "llama-linear")
    del tensors["model.layers.1.mlp.up_proj.weight_scale_inv"]
    save_file(tensors, str(tmp_path / "ck" / "model.safetensors"))
    assert_cli_error(cli("build", tmp_path / "ck", "--out", tmp_path / "b"), "model.layers.1.mlp.up_proj.weight",
                     "weight_scale_inv")


def test_fp8_deepseek_with_its_mtp_module(tmp_path):
    """DeepSeek-V3's published layout: FP8 blocks in the target and in its MTP layer, which drafts losslessly."""
    import speccompile
    from speccompile.compile.presets import tiny_deepseek_checkpoint
    from conftest import assert_lossless, random_prompts
    ck = str(tmp_path / "ck")
    tiny_deepseek_checkpoint(ck, with_mtp=True)
    _quantize_dir(ck)
    build_bundle(ck, str(tmp_path / "b"), drafts=[f"mtp:{ck}"], max_seq_len=128, progress=quiet)
    g = speccompile.load(str(tmp_path / "b"), threads=1)
    assert max(assert_lossless(g, "mtp", random_prompts(3), 24)) > 1.0


def test_block_scales_scale_rows_and_columns_by_their_own_block_sizes():
    """weight_block_size [rows, cols] need not be square: element (i, j) is scaled by scale[i // rows, j // cols],
    the last blocks cut short by the matrix's edge (exact: one float32 product an element)."""
    from speccompile.compile.fp8 import apply_block_scales
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 7)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, (2, 4)).astype(np.float32)  # blocks of 4 rows x 2 columns
    tensors = {"m.weight": w, "m.weight_scale_inv": scale}
    apply_block_scales(tensors, {"m.weight"}, (4, 2))
    i, j = np.indices(w.shape)
    assert np.array_equal(tensors["m.weight"], w * scale[i // 4, j // 2]) and "m.weight_scale_inv" not in tensors
