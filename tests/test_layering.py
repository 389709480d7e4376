"""The package's folders are its data flow: each layer imports only the layers below it.

Every module under ``slidecensus/`` is parsed (not imported) with :mod:`ast`; every
``import``/``from ... import`` of ``slidecensus`` (absolute or relative, at module level, in
functions or under ``TYPE_CHECKING``) is resolved to the module it names, and that
module's layer must be one this module's layer may use (DESIGN.md, "Layout").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slidecensus"

#: Layer of each top-level name under slidecensus (modules and subpackages).
LAYER_OF = {
    "__init__": "ground", "errors": "ground", "weightsfile": "ground",
    "hardware": "ground", "fastops": "ground",
    "tiling": "tiling", "nuclei": "nuclei", "models": "models", "cluster": "cluster",
    "engine": "engine", "reports": "reports",
    "cli": "top", "console": "top", "demo": "top", "__main__": "top",
}
_BELOW_ENGINE = {"ground", "tiling", "nuclei", "models", "cluster"}
#: What each layer may import (itself included).
ALLOWED = {
    "ground": {"ground"},
    "tiling": {"ground", "tiling"},
    "nuclei": {"ground", "tiling", "nuclei"},
    "models": {"ground", "models"},
    "cluster": {"ground", "cluster"},
    "engine": _BELOW_ENGINE | {"engine"},
    "reports": _BELOW_ENGINE | {"engine", "reports"},
    "top": set(LAYER_OF.values()),
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """``slidecensus.engine.census`` for ``slidecensus/engine/census.py``."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """The layer of a dotted module name under ``slidecensus``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "ground"  # slidecensus/__init__.py (the version)
    if parts[1] not in LAYER_OF:
        raise AssertionError(f"{module}: no layer assigned to slidecensus.{parts[1]} "
                             f"(add it to LAYER_OF in {Path(__file__).name})")
    return LAYER_OF[parts[1]]


def imported_modules(source: str, module: str, is_package: bool,
                     root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, dotted name) of every slidecensus module that ``source`` imports."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            # `from . import x` / `from .. import x`: x may itself be a module
            for a in node.names:
                sub = root.parent.joinpath(*f"{base}.{a.name}".split("."))
                if sub.is_dir() or sub.with_suffix(".py").is_file():
                    found.append((node.lineno, f"{base}.{a.name}"))
    return [(line, name) for line, name in found
            if name == "slidecensus" or name.startswith("slidecensus.")]


def violations(root: Path = PACKAGE) -> list[str]:
    """One line per import of a layer above the importer's own."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        own = layer(mod)
        for line, target in imported_modules(path.read_text(encoding="utf-8"), mod,
                                             path.name == "__init__.py", root):
            if layer(target) not in ALLOWED[own]:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {mod} ({own}) imports "
                           f"{target} ({layer(target)})")
    return bad


def test_every_module_imports_only_layers_below():
    bad = violations()
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert names <= set(LAYER_OF), f"unassigned: {sorted(names - set(LAYER_OF))}"


def test_the_synthetic_slide_modules_do_not_import_each_other_both_ways():
    def imports(name: str) -> set[str]:
        path = PACKAGE / "tiling" / f"{name}.py"
        return {t for _, t in imported_modules(path.read_text(), f"slidecensus.tiling.{name}",
                                               False)}

    assert not ("slidecensus.tiling._synth_cells" in imports("synth")
                and "slidecensus.tiling.synth" in imports("_synth_cells"))


@pytest.mark.parametrize("where, code, caught", [
    ("nuclei/bad.py", "from ..engine.census import run_cohort\n", True),
    ("nuclei/bad.py", "def f():\n    from ..reports import export\n", True),
    ("tiling/bad.py", "import slidecensus.nuclei.segment\n", True),
    ("models/bad.py", "from .. import tiling\n", True),
    ("engine/bad.py", "from ..reports.clusters import CLUSTER_FILE\n", True),
    ("engine/bad.py", "from ..nuclei.segment import DEFAULT_MPP\nfrom .. import errors\n", False),
    ("reports/bad.py", "from ..engine.results import RunResults\n", False),
])
def test_the_check_catches_an_upward_import(tmp_path, where, code, caught):
    """The checker itself, on a scratch package: an upward import (also one inside a
    function) is reported, a downward one is not."""
    root = tmp_path / "slidecensus"
    for sub in ("tiling", "nuclei", "models", "engine", "reports"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
        (root / sub / "census.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "errors.py").write_text("")
    (root / where).write_text(code)
    assert bool(violations(root)) is caught, violations(root)
