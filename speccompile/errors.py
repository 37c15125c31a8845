"""Errors that name the problem. The CLI prints `error: <message>` and exits non-zero for any of them."""


class SpeccompileError(Exception):
    """Base class: every user-facing failure is one of these."""


class CheckpointError(SpeccompileError):
    """A checkpoint is missing, corrupt, truncated or incomplete."""


class UnsupportedModelError(SpeccompileError):
    """The architecture (or a feature of it) is not one speccompile lowers."""


class TokenizerMismatchError(SpeccompileError):
    """Draft and target do not share a tokenizer."""


class BundleError(SpeccompileError):
    """A bundle is malformed, tampered with, or from another format version."""


class ContextLengthError(SpeccompileError):
    """A prompt (plus the tokens asked for) does not fit the compiled context."""


class ConfigError(CheckpointError):
    """A config.json value is missing, of the wrong type, out of range or inconsistent with the others."""


class SharedPassError(SpeccompileError):
    """A decoding pass this request shared with others failed in another request's thread: not this request's
    doing (a server answers it as its own failure, not as a bad request)."""
