"""The import rules of the layout (see README, "Design"): lower layers never
import upper ones, and the master never loads the pickler.  Checked on the
source (every import statement, also those inside functions, which run
later) and, for the pickler, in a fresh interpreter."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "cw"

#: Each part of cw and the parts it may import (besides itself).  Lower
#: layers first: errors and settings import nothing of cw; the wire only
#: them; the master and the client sit on the wire side by side; a worker
#: uses the client for the jobs its jobs submit; launching and operating
#: sit on top.
BASE = {"cw", "cw.errors", "cw.settings", "cw.cliargs"}
ALLOWED = {
    "cw.errors": set(),
    "cw.settings": set(),
    "cw.cliargs": set(),
    "cw": {"cw.errors"},      # the package itself; its public names load lazily
    "cw.wire": BASE,
    "cw.master": BASE | {"cw.wire"},
    "cw.client": BASE | {"cw.wire"},
    "cw.worker": BASE | {"cw.wire", "cw.client"},
    "cw.launch": BASE | {"cw.wire", "cw.client"},
    "cw.ops": BASE | {"cw.wire", "cw.client", "cw.launch"},
    "cw.dashboard": BASE | {"cw.wire", "cw.client", "cw.ops"},   # a client of the master, with a web server
    "cw.demo": BASE | {"cw.launch", "cw.client"},
    "cw.joblib": BASE | {"cw.client"},
    # The `cw` command: each subcommand's module is imported by name when it is asked for.
    "cw.cli": BASE,
    "cw.__main__": {"cw.cli"},
    # `python -m cw.status` and `python -m cw.slurm` keep working through these.
    "cw.status": {"cw.ops"},
    "cw.slurm": {"cw.launch"},
}


def part_of(module: str) -> str:
    """The part a dotted module name belongs to: cw.wire.frames -> cw.wire."""
    names = module.split(".")
    return ".".join(names[:2])


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, imported cw module) for every import statement in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from cw import wire` imports cw.wire: count the names as modules where they are.
            if target in ("cw", "cw.wire", "cw.master", "cw.worker", "cw.client", "cw.launch", "cw.ops"):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.append((node.lineno, sub if (ROOT.parent / sub.replace(".", "/")).exists()
                                  or (ROOT.parent / (sub.replace(".", "/") + ".py")).exists() else target))
            else:
                found.append((node.lineno, target))
    return [(line, name) for line, name in found if name == "cw" or name.startswith("cw.")]


SOURCES = sorted(ROOT.rglob("*.py"))


def test_every_part_of_cw_has_a_rule():
    parts = {part_of(module_name(p)) for p in SOURCES}
    assert parts <= set(ALLOWED), f"parts with no import rule: {sorted(parts - set(ALLOWED))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_follow_the_layers(path):
    mine = part_of(module_name(path))
    allowed = ALLOWED[mine] | {mine}
    wrong = [f"line {line}: {name}" for line, name in imports_of(path) if part_of(name) not in allowed]
    assert not wrong, f"{mine} may import only {sorted(allowed)}; it imports {wrong}"


def test_the_master_never_imports_the_pickler():
    offenders = [f"{p.relative_to(ROOT.parent)}:{line}" for p in SOURCES if part_of(module_name(p)) == "cw.master"
                 for line, name in imports_of(p) if name == "cw.wire.payload"]
    assert not offenders


def test_running_the_master_loads_no_pickling_machinery():
    code = ("import sys, cw.master.server, cw.master.__main__\n"
            "print('cloudpickle' in sys.modules, 'pickle' in sys.modules, 'cw.wire.payload' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[0::2] == ["False", "False"], out


def _exception_bases() -> set[str]:
    import builtins
    names = {name for name, value in vars(builtins).items()
             if isinstance(value, type) and issubclass(value, BaseException)}
    tree = ast.parse((ROOT / "errors.py").read_text())
    return names | {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def test_every_exception_cw_raises_is_defined_in_errors_py():
    bases = _exception_bases()
    elsewhere = []
    for path in SOURCES:
        if path == ROOT / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                named = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if named & bases:
                    elsewhere.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}")
    assert not elsewhere, f"exception classes outside cw/errors.py: {elsewhere}"
