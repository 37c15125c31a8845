"""Where a bundle's chat template renders: jinja2's immutable sandbox, within a deadline and a memory budget.

A chat template is code that came with the bundle. jinja2's sandbox bounds what it may touch (no attribute of
Python's internals, no module, no file), not how long it runs or how much it builds. So here:
- it is stopped after TEMPLATE_SECONDS (a template renders in milliseconds);
- no one operation builds more than TEMPLATE_MAX_ITEMS items: `*`, `+`, `~`, `%`, `**` and a call or filter
  given a count or width past that are refused before they run (one C call, which neither the deadline nor the
  memory watch can interrupt);
- its output stops at TEMPLATE_MAX_ITEMS characters beyond (four times) the messages' own;
- it is stopped once the process has grown TEMPLATE_MAX_BYTES since it began (what many small steps build, as a
  filter that pads each of millions of lines).
"""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import re
import threading
import time

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.filters
import jinja2.sandbox
import jinja2.utils

TEMPLATE_SECONDS = 5.0
TEMPLATE_MAX_ITEMS = 1 << 22
TEMPLATE_MAX_BYTES = 1 << 30
_WATCH_S = 0.01  # how often the watch looks at the clock and the process's size
_PRINTF_WIDTHS = re.compile(r"%[#0\- +]*(\d*)(?:\.(\d*))?")
_FORMAT_SPECS = re.compile(r"\{[^{}]*?:([^{}]*)\}")


class TemplateStopped(BaseException):  # not an Exception: jinja2's own handlers pass it through
    """Raised into the rendering thread: the deadline passed ("time"), or the memory budget was spent ("memory")."""


class TemplateRefusal(jinja2.exceptions.TemplateError):
    """The template's own raise_exception: it refuses the conversation (Gemma's "System role not supported")."""


def _too_many(n: int, what: str) -> None:
    if n > TEMPLATE_MAX_ITEMS:
        raise jinja2.exceptions.TemplateRuntimeError(f"{what} of {n} is past the sandbox's limit "
                                                      f"({TEMPLATE_MAX_ITEMS})")


def _check_counts(args, kwargs) -> None:
    """A count or width given to a call: none past TEMPLATE_MAX_ITEMS ('x'.center(10**10), 'x'|indent(10**10))."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool):
            _too_many(abs(a), "a number")


def _check_widths(fmt: str, printf: bool) -> None:
    """The field widths and precisions a format string spells out ('%99999999999s', '{:>99999999999}')."""
    specs = (g for m in _PRINTF_WIDTHS.finditer(fmt) for g in m.groups()) if printf else \
        (d for m in _FORMAT_SPECS.finditer(fmt) for d in re.findall(r"\d+", m.group(1)))
    for digits in specs:
        if digits:
            _too_many(int(digits[:12]), "a field width")


def _length(x) -> int:
    return len(x) if isinstance(x, (str, list, tuple)) else 0


def _checked_join(items) -> str:
    """`~`: the pieces' total length checked before they are joined."""
    pieces = [str(i) for i in items]
    _too_many(sum(map(len, pieces)), "a joined text")
    return "".join(pieces)


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    def visit_Concat(self, node, frame) -> None:
        """`a ~ b` through _checked_join: the sandbox has no hook for it, and doubling a text by it a few times
        over builds gigabytes."""
        self.write("environment.checked_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _CodeGenerator
    checked_join = staticmethod(_checked_join)

    def call_binop(self, context, operator, left, right):
        """*, +, ** and % that would build a huge sequence or number are refused: one C call, no deadline stops
        it."""
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                _too_many(len(seq) * n, "a sequence")
            elif isinstance(left, int) and isinstance(right, int):
                _too_many(left.bit_length() + right.bit_length(), "a product's bit count")
        elif operator == "+":
            _too_many(_length(left) + _length(right), "a sequence")
        elif operator == "%" and isinstance(left, str):
            _check_widths(left, printf=True)
            _check_counts(right if isinstance(right, tuple) else (right,), {})
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(right) > 4096:
                raise jinja2.exceptions.TemplateRuntimeError(f"an exponent of {right} is too large")
            _too_many(left.bit_length() * abs(right), "a power's bit count")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
        _check_counts(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_widths(value.__self__, printf=False)
        return wrapped

    def unsafe_undefined(self, obj, attribute):
        """Refuse an unsafe attribute (__class__, __globals__, ...) at once: jinja2's default hands back an
        undefined value that renders as "" and fails only when used further, so a probe would pass unnoticed."""
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} "
                                              "object is unsafe")


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers' tag marking the assistant's text for training (TRL's
    assistant-only loss), which fine-tuned models keep in their templates. Rendering, it is its body as is."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _counted(f):
    """A filter whose counts and widths (its arguments after the value) are checked first."""
    skip = 2 if jinja2.utils._PassArg.from_obj(f) else 1  # a context or environment, then the value

    def filtered(*args, **kwargs):
        _check_counts(args[skip:], kwargs)
        return f(*args, **kwargs)
    filtered.__dict__.update(getattr(f, "__dict__", {}))  # jinja2's pass_context / pass_environment marks
    return filtered


def sandbox() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (its generation blocks rendered, not tracked)."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlocks])
    env.filters = {name: _counted(f) for name, f in env.filters.items()}
    env.filters["tojson"] = _tojson
    env.filters["format"] = _counted(_printf)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


def render(compiled, limit: int, **variables) -> str:
    """compiled() (the template, compiled on first use: compiling folds constants, which runs filters) rendered
    to at most `limit` characters, within the deadline and the memory budget."""
    def run() -> str:
        out, n = [], 0
        for piece in compiled().generate(**variables):
            n += len(piece)
            if n > limit:
                raise jinja2.exceptions.TemplateRuntimeError(f"its text passed {limit} characters")
            out.append(piece)
        return "".join(out)
    return _within(TEMPLATE_SECONDS, run)


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # no /proc: the deadline alone
        return None


def _within(seconds: float, render_now):
    """render_now() in this thread, interrupted by TemplateStopped (its reason as its argument) raised into it
    after `seconds`, or once the process has grown TEMPLATE_MAX_BYTES."""
    tid, lock, state = ctypes.c_ulong(threading.get_ident()), threading.Lock(), {"done": False, "why": None}
    done, start, deadline = threading.Event(), _rss(), time.monotonic() + seconds

    def watch():
        while not done.wait(_WATCH_S):
            grown = start is not None and (_rss() or 0) - start > TEMPLATE_MAX_BYTES
            if grown or time.monotonic() > deadline:
                with lock:
                    if not state["done"]:
                        state["why"] = "memory" if grown else "time"
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(tid, ctypes.py_object(TemplateStopped))
                return
    threading.Thread(target=watch, daemon=True).start()
    try:
        return render_now()
    except TemplateStopped:
        raise TemplateStopped(state["why"]) from None
    finally:
        with lock:
            state["done"] = True
            if state["why"]:  # raised already, or still pending: never later, elsewhere
                ctypes.pythonapi.PyThreadState_SetAsyncExc(tid, None)
        done.set()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if isinstance(indent, int):
        _too_many(indent, "an indent")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _printf(value, *args, **kwargs) -> str:
    """jinja2's `format` filter (printf style), its widths checked."""
    if isinstance(value, str):
        _check_widths(value, printf=True)
    return jinja2.filters.do_format(value, *args, **kwargs)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _raise(msg):
    raise TemplateRefusal(msg)
