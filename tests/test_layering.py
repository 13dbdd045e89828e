"""The engines stay independent: neither `defuse_jax.search` nor `defuse_jax.mixture` imports the
other, the models or the pipeline, and what they share (`defuse_jax._plumbing`) imports nothing
else of the package. The labeling modules import one way (answers <- labels_file <- automatic,
terminal), and only the orchestration imports the pipeline. Read from the source (no import), so
a lazy import counts too."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "defuse_jax"


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every `defuse_jax...` module a file imports (`from defuse_jax import x` gives both
    `defuse_jax` and `defuse_jax.x`, since x may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "defuse_jax" or m.startswith("defuse_jax.")}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


FORBIDDEN = {
    "search": ("defuse_jax.mixture", "defuse_jax.models", "defuse_jax.pipeline",
               "defuse_jax.stages"),
    "mixture": ("defuse_jax.search", "defuse_jax.models", "defuse_jax.pipeline",
                "defuse_jax.stages"),
}  # fmt: skip


@pytest.mark.parametrize("engine", sorted(FORBIDDEN))
def test_engines_import_neither_each_other_nor_models_nor_stages_nor_pipeline(engine):
    bad = {
        f"{path.relative_to(PACKAGE)}: {module}"
        for path in sorted((PACKAGE / engine).rglob("*.py"))
        for module in imported_modules(path)
        if any(_under(module, prefix) for prefix in FORBIDDEN[engine])
    }
    assert not bad, sorted(bad)


def test_shared_plumbing_imports_nothing_else_of_the_package():
    bad = {
        f"{path.relative_to(PACKAGE)}: {module}"
        for path in sorted((PACKAGE / "_plumbing").rglob("*.py"))
        for module in imported_modules(path)
        if not _under(module, "defuse_jax._plumbing")
    }
    assert not bad, sorted(bad)


def test_both_engines_use_the_shared_plumbing():
    """The plumbing has one home: each engine imports it rather than carrying a copy."""
    for engine in FORBIDDEN:
        modules = set().union(*map(imported_modules, (PACKAGE / engine).rglob("*.py")))
        for part in ("threefry", "keys", "row_layout"):
            assert f"defuse_jax._plumbing.{part}" in modules, (engine, part)


# Which labeling modules each labeling module may import; the package itself only re-exports.
LABELING = {
    "answers": set(),
    "labels_file": {"answers"},
    "automatic": {"answers", "labels_file"},
    "terminal": {"answers", "labels_file"},
}


def test_labeling_modules_import_one_way():
    modules = {path.stem for path in (PACKAGE / "labeling").glob("*.py")} - {"__init__"}
    assert modules == set(LABELING), "a new labeling module needs its place in LABELING"
    bad = set()
    for name, allowed in LABELING.items():
        for module in imported_modules(PACKAGE / "labeling" / f"{name}.py"):
            if _under(module, "defuse_jax.labeling"):
                part = module.removeprefix("defuse_jax.labeling").lstrip(".").split(".")[0]
                if part not in allowed:
                    bad.add(f"labeling/{name}.py: {module}")
    assert not bad, sorted(bad)


# The orchestration and its front ends; every other module (the stages among them) must not
# know the pipeline, so that nothing imports in a circle.
ORCHESTRATION = {"pipeline.py", "cli.py", "budget_sweep.py"}


def test_only_the_orchestration_imports_the_pipeline():
    bad = {
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if str(path.relative_to(PACKAGE)) not in ORCHESTRATION
        and "defuse_jax.pipeline" in imported_modules(path)
    }
    assert not bad, sorted(bad)


def test_only_the_files_module_renames_files():
    """Atomic writes have one home (`files`): no other module renames files itself."""
    renames = ("os.replace(", "os.rename(")
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "files.py" and any(r in path.read_text() for r in renames)
    ]
    assert offenders == []


def test_each_stage_is_one_module_of_the_stages_package():
    """A newcomer finds the six stages from the file list: `stages/<name>.py` per run stage, in
    the run's order, each defining `stage_<name>`, and none importing the orchestration."""
    from defuse_jax.run_config import STAGES

    modules = {path.stem for path in (PACKAGE / "stages").glob("*.py")} - {"__init__"}
    assert modules == set(STAGES)
    for name in STAGES:
        path = PACKAGE / "stages" / f"{name}.py"
        assert f"def stage_{name}(" in path.read_text(), name
        assert not {"defuse_jax.pipeline", "defuse_jax.cli"} & imported_modules(path), name


def _module_names() -> dict[str, pathlib.Path]:
    """{dotted module name: its file} for every module of the package."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _edges(path: pathlib.Path, modules) -> set[str]:
    """The package's modules `path` imports: `from pkg import sub` is an import of `pkg.sub`
    alone when that is a module (its package's __init__ has run by then anyway, as with any
    submodule), else of `pkg`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
            found.update(subs)
            if len(subs) < len(node.names):  # names that are not modules come from the package
                found.add(node.module)
    return {m for m in found if m in modules and m != "defuse_jax"}


def test_no_module_imports_another_that_imports_it_back():
    """No import circle, lazy and type-checking imports included: every strongly connected
    component of the import graph is a single module."""
    modules = _module_names()
    graph = {m: _edges(path, modules) - {m} for m, path in modules.items()}
    order, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    assert not circles, circles
