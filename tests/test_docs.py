"""The documentation against the tree: links and anchors resolve, the files and modules it names exist, and every
option it gives a `speccompile` command is one that command takes. Doc rot fails here, not in a reader's shell."""
import glob
import os
import re

import pytest

from speccompile.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "plugins/tree_attention/README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# results.md is a diary: the tools it names may have been replaced since (it says which), but its commands must run
CURRENT_DOCS = [d for d in DOCS if d != "docs/results.md"]
# where a path the docs name may start: the repository root, or the package (docs/design.md writes `compile/...`)
PATH_ROOTS = ("speccompile/", "tools/", "tests/", "docs/", "graphs/", "plugins/", ".ci/")
PACKAGE_DIRS = ("cli/", "bench/", "train/", "serve/", "compile/", "runtime/", "format/")


def read(doc: str) -> str:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' dropped, spaces as '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: str) -> set[str]:
    """Every heading's anchor, a repeated one numbered as GitHub numbers it (-1, -2, ...)."""
    seen: dict[str, int] = {}
    for line in read(doc).splitlines():
        if line.startswith("#"):
            base = slug(line.lstrip("#"))
            seen[base] = seen.get(base, -1) + 1
            if seen[base]:
                seen[f"{base}-{seen[base]}"] = 0
    return set(seen)


def links(doc: str) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", read(doc)) if not re.match(r"[a-z]+:", m)]


@pytest.mark.parametrize("doc", DOCS)
def test_every_link_and_anchor_resolves(doc):
    broken = []
    for link in links(doc):
        path, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(os.path.join(ROOT, target)):
            broken.append(f"{link}: no file {target}")
        elif anchor and target.endswith(".md") and anchor not in anchors(target):
            broken.append(f"{link}: no heading with that anchor in {target}")
    assert not broken, f"{doc}: {broken}"


FENCED = re.compile(r"```.*?```", re.S)


def inline_spans(text: str) -> list[str]:
    """The `code spans` of a doc's prose (its fenced blocks left out: their backticks pair with nothing)."""
    return re.findall(r"`([^`]+)`", FENCED.sub("", text))


def named_paths(doc: str) -> set[str]:
    """The repository paths in a doc's code spans: `tools/ci_gate.sh`, `compile/families.py` (the package's). The
    fenced blocks' commands name outputs too (a build folder), so they are left to the option check below."""
    found = set()
    for span in inline_spans(read(doc)):
        for token in re.findall(r"(?<![\w./~-])\.?[\w][\w./-]*", span):
            token = token.rstrip(".")
            if token.startswith(PATH_ROOTS) or token.startswith(PACKAGE_DIRS) and token.endswith(".py"):
                found.add(token)
    return found


@pytest.mark.parametrize("doc", CURRENT_DOCS)
def test_every_named_file_exists(doc):
    missing = [p for p in sorted(named_paths(doc))
               if not any(os.path.exists(os.path.join(ROOT, base, p)) for base in ("", "speccompile"))]
    assert not missing, f"{doc} names files that are not in the tree: {missing}"


def command_lines(text: str):
    """(command, its argument text) for every `speccompile COMMAND ...` in code spans and blocks; a block's
    command runs on over lines that continue it (a trailing backslash, or an indented `[--option`)."""
    for span in FENCED.findall(text) + inline_spans(text):
        for m in re.finditer(r"speccompile\s+(?:--debug\s+)?([a-z][a-z-]*)((?:[^&;#\n|]|\\\n|\n(?=\s+\[?--))*)",
                             span):
            yield m.group(1), m.group(2)


def options_of(command) -> set[str]:
    return {o for p in command.params for o in [*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ())]}


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_option_exists(doc):
    unknown = []
    for name, args in command_lines(read(doc)):
        command = main.commands.get(name)
        if command is None:
            continue  # prose such as "speccompile builds ...", not a command line
        unknown += [f"{name} {o}" for o in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", args)
                    if o not in options_of(command) | {"--help"}]
    assert not unknown, f"{doc} gives options these commands do not take: {sorted(set(unknown))}"


def test_the_checks_see_the_docs():
    """The extractors find what they check: a doc whose commands or paths they could no longer parse would
    pass every test above without checking anything."""
    readme = read("README.md")
    assert {"build", "generate", "inspect", "bench", "gate", "train-head", "serve"} <= {
        name for name, _ in command_lines(readme)}
    assert "compile/families.py" in named_paths("README.md") and "tools/ci_gate.sh" in named_paths("docs/design.md")
    assert "#the-ci-gates-thresholds" in {f"#{link.partition('#')[2]}" for link in links("docs/design.md")}
    assert "the-ci-gates-thresholds" in anchors("docs/results.md")


# packages whose docstring is the map of their modules: a module moved in or split out must appear there
MAPPED_PACKAGES = ("speccompile/bench", "speccompile/serve", "speccompile/train")


@pytest.mark.parametrize("package", MAPPED_PACKAGES)
def test_package_docstrings_name_every_module(package):
    import ast
    with open(os.path.join(ROOT, package, "__init__.py"), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    modules = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, package, "*.py")))
    unnamed = [m for m in modules if m != "__init__.py" and not re.search(rf"(?<![\w.]){re.escape(m)}", doc)]
    assert not unnamed, f"{package}/__init__.py's docstring does not name {unnamed}"


# a time or a speed, the kind of figure that goes stale: docs/results.md holds them, with their date and machine
MEASURED = re.compile(r"(?<![\w.])\d+(\.\d+)? ?(ns|us|µs|ms|tok/s|tokens/s|GB/s)(?!\w)|(?<![\w.])\d+\.\d+ ?×")


def comments_and_docstrings(path: str) -> list[tuple[int, str]]:
    """(line, text) of a Python file's comments and docstrings."""
    import ast
    import io
    import tokenize
    with open(path, encoding="utf-8") as f:
        source = f.read()
    found = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
             if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((getattr(node, "lineno", 1), doc))
    return found


def test_code_comments_hold_no_measured_figures():
    """A measured time or speed in a comment goes stale unseen: it belongs in docs/results.md, which dates it."""
    paths = glob.glob(os.path.join(ROOT, "speccompile", "**", "*.py"), recursive=True)
    paths += glob.glob(os.path.join(ROOT, "tools", "*.py"))
    figures = [f"{os.path.relpath(p, ROOT)}:{line}: {m.group(0)}" for p in sorted(paths)
               for line, text in comments_and_docstrings(p) for m in MEASURED.finditer(text)]
    assert paths and not figures, f"measured figures in code comments (move them to docs/results.md): {figures}"
