"""The layering of the package, read from the source with ``ast`` (every import, lazy ones too).

Layers, bottom up:

- **shared modules** ``llmkit/{errors,runtime,security,templates,_jinja_sandbox,runs}.py`` and
  **``llmkit/core/``**: what several jobs use (atomic output, model loading, tokenizers, the
  prepared layout and its manifest, scoring, the caches). They import no job.
- **jobs** ``llmkit/{data,training,generation,evaluation,serve,export}/``: each imports the layer
  below and not another job, except these edges, each a job built on another's public
  function rather than a copy of it:

  - ``serve -> generation``: the server is generation behind HTTP (its batching, settings and
    end-of-turn handling are generation's; copying them would fork them);
  - ``evaluation -> generation``: the harness's generative tasks generate text, with the same
    settings and stopping rule as ``llmkit generate``.

- **entry points** ``llmkit/cli/``, ``llmkit/__init__.py``, ``llmkit/__main__.py``: may import
  anything, jobs only lazily (inside the command), so that ``llmkit --help`` stays fast: no
  module-level import chain from ``llmkit/cli`` reaches torch, transformers, datasets,
  accelerate or tokenizers (ruff's TID253 checks the direct imports; this checks the chains).

Also: a library's private API (``lib._name``, ``from lib._mod import x``) is reached only from
``llmkit/core/compat.py``, where each use names its version and upstream issue.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "llmkit"
JOBS = ("data", "training", "generation", "evaluation", "serve", "export")
SHARED = ("errors", "runtime", "security", "templates", "_jinja_sandbox", "runs", "core")
ENTRY = ("cli", "__init__", "__main__")
ALLOWED = {("serve", "generation"), ("evaluation", "generation")}
HEAVY = ("torch", "transformers", "datasets", "accelerate", "tokenizers")
LIBRARIES = ("accelerate", "lm_eval", "transformers", "datasets", "tokenizers", "peft", "torch")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    """``llmkit.training.plan`` -> ``training``; ``llmkit`` (its __init__) -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import in ``tree``; relative
    imports resolved. Module level: not inside a function or class, nor ``if TYPE_CHECKING``."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, False)
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, False)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_package else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                found.append((base, child.lineno, top))
                for alias in child.names:  # from llmkit.core import atomic: a module too
                    found.append((f"{base}.{alias.name}", child.lineno, top))
            visit(child, top)

    visit(tree, True)
    return found


def _sources() -> dict[str, tuple[Path, ast.AST]]:
    return {
        _module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"), str(p)))
        for p in sorted(ROOT.rglob("*.py"))
    }


SOURCES = _sources()


def _edges():
    for module, (path, tree) in SOURCES.items():
        for target, line, top in _imports(tree, module, path.name == "__init__.py"):
            yield module, path, target, line, top


def test_the_package_is_laid_out_in_the_layers_this_test_knows():
    layers = {_layer(m) for m in SOURCES}
    assert layers == set(JOBS) | set(SHARED) | set(ENTRY), layers


def test_the_shared_layer_imports_no_job():
    bad = [
        f"{path.relative_to(ROOT.parent)}:{line} imports {target}"
        for module, path, target, line, _ in _edges()
        if _layer(module) in SHARED
        and target.startswith("llmkit.")
        and _layer(target) in JOBS + ("cli",)
    ]
    assert not bad, "the shared layer imports a job:\n" + "\n".join(bad)


def test_jobs_import_the_shared_layer_not_each_other():
    bad = [
        f"{path.relative_to(ROOT.parent)}:{line} imports {target}"
        for module, path, target, line, _ in _edges()
        if _layer(module) in JOBS
        and target.startswith("llmkit.")
        and _layer(target) in JOBS + ("cli",)
        and _layer(target) != _layer(module)
        and (_layer(module), _layer(target)) not in ALLOWED
    ]
    assert not bad, "a job imports another job:\n" + "\n".join(bad)


def _module_level_closure(start: str) -> dict[str, str]:
    """Every module reached from ``start`` through module-level imports: ``{module: the
    llmkit module that imported it}`` (external modules by their top-level name)."""
    reached: dict[str, str] = {}
    todo = [start]
    while todo:
        module = todo.pop()
        path, tree = SOURCES[module]
        for target, _, top in _imports(tree, module, path.name == "__init__.py"):
            if not top:
                continue
            if target.startswith("llmkit"):
                chain = target.split(".")
                for i in range(1, len(chain) + 1):  # importing a.b.c runs a, a.b, a.b.c
                    name = ".".join(chain[:i])
                    if name in SOURCES and name not in reached:
                        reached[name] = module
                        todo.append(name)
            else:
                reached.setdefault(target.split(".")[0], module)
    return reached


@pytest.mark.parametrize("cli", sorted(m for m in SOURCES if _layer(m) == "cli"))
def test_the_cli_reaches_no_heavy_library_at_module_level(cli):
    reached = _module_level_closure(cli)
    heavy = {lib: reached[lib] for lib in HEAVY if lib in reached}
    assert not heavy, f"importing {cli} imports {heavy} (library: imported by)"


def test_private_library_apis_are_used_only_in_core_compat():
    """``lib._private`` attribute access on an imported library module, or an import from a
    private library module or of a private name, anywhere but llmkit/core/compat.py."""
    bad = []
    for module, (path, tree) in SOURCES.items():
        if module == "llmkit.core.compat":
            continue
        library_names = set()  # local names bound to library modules
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in LIBRARIES:
                        library_names.add(a.asname or a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                if node.module.split(".")[0] not in LIBRARIES:
                    continue
                private_module = any(p.startswith("_") for p in node.module.split("."))
                private_name = any(
                    a.name.startswith("_") and not a.name.startswith("__") for a in node.names
                )
                if private_module or private_name:
                    bad.append(f"{path.name}:{node.lineno} from {node.module} import ...")
                library_names.update(a.asname or a.name for a in node.names)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in library_names
            ):
                bad.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    assert not bad, "private library API outside llmkit/core/compat.py:\n" + "\n".join(bad)
