"""speccompile: compile a model and its drafters into static ONNX graphs; decode speculatively from the bundle."""
__version__ = "0.1.0"


def load(bundle_dir: str, **kwargs):
    """Load a bundle for generation (imports only numpy, onnxruntime, tokenizers)."""
    from speccompile.runtime.generator import Generator
    return Generator.load(bundle_dir, **kwargs)
