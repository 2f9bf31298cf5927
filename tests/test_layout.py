"""The package layout is the architecture: the library (gates, models, structures, compile,
checkpoints, measures) never imports the applications built on it (data, train, pretrain,
evaluate, cli), and ``import prune`` loads torch and safetensors only."""

import ast
import subprocess
import sys
from pathlib import Path

import prune

PACKAGE = Path(prune.__file__).parent
# prune.extract reads audio folders and manifests (prune.data): an application of the library
APPLICATIONS = ("prune.data", "prune.train", "prune.pretrain", "prune.evaluate", "prune.cli", "prune.extract")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """Every module ``path`` imports (at any depth of the file: lazy imports count too), absolute."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # `from . import x`


def _is_application(name: str) -> bool:
    return any(name == app or name.startswith(app + ".") for app in APPLICATIONS)


def test_library_never_imports_the_applications():
    library = [p for p in PACKAGE.rglob("*.py") if not _is_application(_module_name(p))]
    assert any(p.parent.name == "structures" for p in library) and any(p.parent.name == "checkpoints" for p in library)
    offences = [f"{p.relative_to(PACKAGE.parent)} imports {name}"
                for p in library for name in _imports(p) if _is_application(name)]
    assert not offences, "\n".join(offences)


def test_the_scan_resolves_relative_and_lazy_imports(monkeypatch, tmp_path):
    # the scan above must be able to fail: a library file importing the trainer, relatively and
    # inside a function, is seen as importing prune.train / prune.data
    fake = tmp_path / "prune" / "checkpoints" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..train.recipe import PruneRecipe\n    from .. import data\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "prune")
    names = set(_imports(fake))
    assert {"prune.train.recipe", "prune.data"} <= names
    assert all(_is_application(n) for n in ("prune.train.recipe", "prune.data"))


def test_import_prune_loads_torch_and_safetensors_only():
    code = ("import sys; base = set(sys.modules); import torch, safetensors.torch; with_torch = set(sys.modules); "
            "import prune; new = {m.split('.')[0] for m in set(sys.modules) - with_torch}; "
            "print(' '.join(sorted(new - set(sys.stdlib_module_names) - {'prune', 'torch', 'safetensors'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [], f"import prune also loads: {out}"


def test_every_package_is_installed():
    # pyproject lists its packages by name: a new folder under prune/ missing there would be left out
    # of a plain `pip install .` (the editable install and the tests here would not notice)
    tomllib = __import__("tomllib") if sys.version_info >= (3, 11) else None
    if tomllib is None:
        import pytest
        pytest.skip("tomllib needs Python 3.11")
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"pyproject.toml [tool.setuptools] packages lacks {sorted(found - listed)}"
