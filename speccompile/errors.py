"""Errors that name the problem. The CLI prints `error: <message>` and exits non-zero for any of them.

An option the Python API and the CLI share is named in a message through `option` or `given`, so that each caller
reads its own spelling: `str(e)` names the keyword (`max_new_tokens=0: ...`), `e.cli_message()` the flag
(`--max-new-tokens 0: ...`)."""
from __future__ import annotations

import re

# An option's mention inside a message: keyword, flag and the value's repr (empty when none was given), between
# private-use characters that repr() of any value escapes, so no value can forge or break a mention.
_OPEN, _SEP, _CLOSE = "\ue000", "\ue001", "\ue002"
_MENTION = re.compile(f"{_OPEN}([^{_SEP}]*){_SEP}([^{_SEP}]*){_SEP}([^{_CLOSE}]*){_CLOSE}")


def option(keyword: str, flag: str | None = None) -> str:
    """An option named in a message: `keyword` in Python, `flag` (by default --keyword-with-dashes) on the
    command line."""
    return f"{_OPEN}{keyword}{_SEP}{flag or '--' + keyword.replace('_', '-')}{_SEP}{_CLOSE}"


def given(keyword: str, value, flag: str | None = None, limit: int | None = None) -> str:
    """An option with the value it was given: `keyword=value` in Python, `--flag value` on the command line; the
    value's repr cut to `limit` characters (a long string would fill the line)."""
    return option(keyword, flag)[:-1] + repr(value)[:limit] + _CLOSE


def spelled(message: str, cli: bool) -> str:
    """The message with each mention of an option spelled for the Python API or (cli) for the command line."""
    def one(m: re.Match) -> str:
        keyword, flag, value = m.groups()
        if cli:  # a switch is its flag alone (overwrite=True is --force, speculate=False --no-speculate)
            return f"{flag} {_as_typed(value)}" if value and value not in ("True", "False") else flag
        return f"{keyword}={value}" if value else keyword
    return _MENTION.sub(one, message)


def reworded(e: SpeccompileError, mentions: dict[str, str]) -> SpeccompileError:
    """The same refusal with each mention of an option in `mentions` (keyword -> an `option` or `given`) replaced:
    for a caller that passed the value inside another option (bench's --drafter NAME~typical:EPS carries an
    acceptance)."""
    return _like(e, _MENTION.sub(lambda m: mentions.get(m.group(1), m.group(0)), e.unspelled()))


def mentioned(e: SpeccompileError) -> list[str]:
    """The keywords of the options a refusal names, in order (a server reports the first as the field at fault)."""
    return [m.group(1) for m in _MENTION.finditer(e.unspelled())]


def prefixed(e: SpeccompileError, where: str) -> SpeccompileError:
    """The same refusal, saying where it arose first (`where: message`), its option mentions kept."""
    return _like(e, f"{where}: {e.unspelled()}")


def _like(e: SpeccompileError, message: str) -> SpeccompileError:
    """A refusal of e's kind and cause with another message."""
    copy = type(e)(message)
    copy.__cause__ = e.__cause__
    return copy


def _as_typed(shown: str) -> str:
    """A value as a command line would have it: a plain word unquoted (--tree chain:3), anything else (spaces,
    quotes, an empty string, characters repr() escapes) as repr() shows it."""
    inner = shown[1:-1] if len(shown) > 2 and shown[0] == shown[-1] and shown[0] in "'\"" else None
    return inner if inner is not None and re.fullmatch(r"[\w.:,+/@~-]+", inner) else shown


class SpeccompileError(Exception):
    """Base class: every user-facing failure is one of these. Its text names options as the Python API spells
    them; `cli_message()` as the command line does."""

    def __str__(self) -> str:
        return spelled(self.unspelled(), cli=False)

    def cli_message(self) -> str:
        return spelled(self.unspelled(), cli=True)

    def unspelled(self) -> str:
        """The message with its option mentions as raised (for a refusal made from this one)."""
        return super().__str__()


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
