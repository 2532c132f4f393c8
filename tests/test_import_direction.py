"""Imports run one way: the top layer (server, bench, train, profiler) -> engine -> kernels. Kernels import nothing of
ours, the engine only itself and kernels, and the top-layer packages the engine and kernels but not each other.
Every import counts, at any depth (function-local, under `if TYPE_CHECKING:`), relative ones resolved."""
import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"kernels": 0, "engine": 1, "server": 2, "bench": 2, "train": 2, "profiler": 2}
TOP = max(LAYERS.values())


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """engine/drafts/loader.py -> ('engine.drafts.loader', False), engine/drafts/__init__.py -> ('engine.drafts',
    True)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def imports(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in source, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[:len(package) - (node.level - 1)] if node.level - 1 <= len(package) else []
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((node.lineno, name))
    return found


def allowed(importer: str, imported: str) -> bool:
    if imported not in LAYERS or imported == importer:
        return True
    if LAYERS[importer] == TOP:
        return LAYERS[imported] < TOP  # the engine and kernels, never a sibling top-layer package
    return LAYERS[imported] < LAYERS[importer]


def violations(root: Path) -> tuple[list[tuple[str, int, str]], int]:
    """Every (file, line, imported module) reaching a layer above or a sibling top-layer package, and the number of
    files read."""
    bad, files = [], 0
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            module, is_package = module_name(path, root)
            files += 1
            for line, name in imports(path.read_text(encoding="utf-8"), module, is_package):
                if not allowed(package, name.split(".")[0]):
                    bad.append((path.relative_to(root).as_posix(), line, name))
    return bad, files


def test_imports_run_one_way():
    bad, files = violations(REPO_ROOT)
    assert files > 50  # the walk really read the packages
    assert not bad, "imports against the layering (top -> engine -> kernels):\n" + "\n".join(
        f"{path}:{line}: imports {name}" for path, line, name in bad)


def write(root: Path, files: dict[str, str]):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_checker_finds_planted_violations(tmp_path):
    """Negative control: the same checker over a tiny tree with upward, sibling, function-local and relative imports
    reports exactly the planted ones."""
    write(tmp_path, {
        "kernels/__init__.py": "",
        "kernels/x.py": "import torch\nfrom . import y\n\nfrom engine.config import Y\n",
        "kernels/y.py": "import kernelsx\n",  # a name that merely starts like ours is not ours
        "engine/__init__.py": "from engine.a import A\n",
        "engine/a.py": "from kernels import x\nimport engine.sub.b\n\n\ndef f():\n    from server.app import create\n",
        "engine/sub/__init__.py": "from .b import B\n",
        "engine/sub/b.py": "from ..a import A\nfrom .. import a\nif False:\n    import profiler\n",
        "bench/y.py": "import engine\nfrom kernels.x import Z\n\n\nclass C:\n    def m(self):\n"
                      "        import train.sts\n",
        "train/t.py": "from engine.a import A\nfrom .u import U\n",
        "server/s.py": "from bench import report\n",
        "profiler/p.py": "import engine.a, kernels.x\n",
    })
    bad, files = violations(tmp_path)
    assert files == 11
    assert sorted(bad) == [("bench/y.py", 7, "train.sts"), ("engine/a.py", 6, "server.app"),
                           ("engine/sub/b.py", 4, "profiler"), ("kernels/x.py", 4, "engine.config"),
                           ("server/s.py", 1, "bench")]


def test_relative_imports_resolve_against_the_package():
    assert imports("from ..a import A\nfrom . import c\n", "engine.sub.b", False) == [(1, "engine.a"),
                                                                                   (2, "engine.sub")]
    assert imports("from .b import B\n", "engine.sub", True) == [(1, "engine.sub.b")]
    assert imports("from ...x import y\n", "bench.m", False) == [(1, "x")]  # beyond the top: never one of ours
