"""speccompile: compile a model and its drafters into static ONNX graphs; decode speculatively from the bundle.

    gen = speccompile.load("bundle/")
    gen.generate("Tell me a story", 128).text
    for chunk in gen.stream("Tell me a story", 128, params=speccompile.SamplingParams(temperature=0.7, seed=0)):
        print(chunk.text, end="")
    gen.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]).text
"""
from speccompile.runtime.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["SamplingParams", "load"]


def load(bundle_dir: str, **kwargs):
    """Load a bundle for generation (imports only numpy, onnxruntime, tokenizers, jinja2, jsonschema): a
    speccompile.runtime.generator.Generator. kwargs: threads, device, verify, and the context cache's
    context_cache, cache_bytes, cache_dir."""
    from speccompile.runtime.context_cache import check_cache_dir
    from speccompile.runtime.generator import Generator
    from speccompile.runtime.request import check_load_options, plain_paths
    check_load_options(bundle_dir, kwargs)
    check_cache_dir(bundle_dir, kwargs.get("cache_dir"), kwargs.get("context_cache", True))  # before the hashing
    bundle_dir, kwargs = plain_paths(bundle_dir, kwargs)
    return Generator.load(bundle_dir, **kwargs)

