"""The package's floors (docs/layout.md): every import of one of our modules, at module level, inside a function or
under TYPE_CHECKING, goes to the same floor or one below, and no set of modules imports itself round in a circle.
The checker is tested on a tree with an upward import and a circle added, and every module imports on its own."""

import ast
import os
import sys

import pytest
from common import REPO

# bottom first; a module belongs to the first floor one of whose prefixes it starts with (docs/layout.md says why)
FLOORS = [
    ("base", ["ddpm_hf", "ddpm_hf.choices", "ddpm_hf.errors", "ddpm_hf.paths", "ddpm_hf.seeding", "ddpm_hf.devices",
              "ddpm_hf.cpu_threads", "ddpm_hf.sizes"]),
    ("outputs", ["ddpm_hf.outputs"]),
    ("diffusion", ["ddpm_hf.diffusion"]),
    ("data", ["ddpm_hf.data"]),
    ("pipelines", ["ddpm_hf.pipelines"]),
    ("saved", ["ddpm_hf.saved"]),
    ("sampling", ["ddpm_hf.sampling"]),
    ("measuring", ["ddpm_hf.measuring"]),
    ("recipes", ["ddpm_hf.recipes"]),
    ("publishing", ["ddpm_hf.publishing"]),
    ("training", ["ddpm_hf.training"]),
    ("commands", ["ddpm_hf.commands"]),
]


def floor_of(module: str) -> int:
    best, floor = -1, None
    for number, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), number
    if floor is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS and docs/layout.md")
    return floor


def module_sources() -> dict:
    """Every module of the package, by its dotted name (pipelines/ installs as ddpm_hf.pipelines)."""
    found = {}
    for root, package in ((REPO / "ddpm_hf", "ddpm_hf"), (REPO / "pipelines", "ddpm_hf.pipelines")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = (path.read_text(), path.name == "__init__.py")
    return found


def imports_of(name: str, source: str, is_package: bool, known: set) -> set:
    """The modules of ours `name` imports anywhere in its source (a `from X import y` of a submodule y counts as X.y)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
    return {t for t in found if t in known and t != name}


def floor_problems(sources: dict) -> list:
    """Every upward import and every circle among `sources`, as lines."""
    known = set(sources)
    graph = {name: imports_of(name, source, is_package, known) for name, (source, is_package) in sources.items()}
    problems = [f"{a} ({FLOORS[floor_of(a)][0]}) imports {b} ({FLOORS[floor_of(b)][0]}), a floor above"
                for a, targets in sorted(graph.items()) for b in sorted(targets) if floor_of(b) > floor_of(a)]
    # a package's __init__ importing its own submodules is how a package exports; it is not a circle
    edges = {a: {b for b in targets if not b.startswith(a + ".")} for a, targets in graph.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                problems.append("circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return problems


def test_every_import_goes_down_and_no_modules_import_round_in_a_circle():
    assert floor_problems(module_sources()) == []


def test_the_checker_sees_an_upward_import_anywhere_in_a_module_and_a_circle():
    sources = module_sources()
    in_function = "def f():\n    from ddpm_hf.training.loop import train\n"
    under_type_checking = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ddpm_hf.commands import sample\n"
    for text in (in_function, under_type_checking):
        broken = {**sources, "ddpm_hf.diffusion.upward": (text, False)}
        assert any("ddpm_hf.diffusion.upward" in line and "a floor above" in line for line in floor_problems(broken))
    circle = {**sources, "ddpm_hf.sampling.ring_a": ("from ddpm_hf.sampling import ring_b\n", False),
              "ddpm_hf.sampling.ring_b": ("import ddpm_hf.sampling.ring_a\n", False)}
    assert any(line.startswith("circle: ddpm_hf.sampling.ring_a") for line in floor_problems(circle))


def test_the_layout_page_names_every_floor_in_order():
    text = (REPO / "docs" / "layout.md").read_text()
    positions = [text.find(f"**{name}**") for name, _ in FLOORS]
    assert -1 not in positions and positions == sorted(positions), positions


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """`python -c "import ddpm_hf.X"` for every module: each in a fresh child (forked after the third-party
    libraries loaded, so that only our own import order is under test)."""
    import diffusers  # noqa: F401
    import torch  # noqa: F401

    failed = []
    for name in sorted(module_sources()):
        pid = os.fork()
        if pid == 0:  # the child: nothing of ours is loaded
            code = 0
            try:
                for loaded in [m for m in sys.modules if m == "ddpm_hf" or m.startswith("ddpm_hf.")]:
                    del sys.modules[loaded]
                __import__(name)
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(name)
    assert failed == []
