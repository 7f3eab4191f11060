"""List functions longer than a limit (default 60 lines), numba kernels excepted: ``python tools/long_functions.py evgrid``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def _numba(node: ast.AST) -> bool:
    return any("nb." in ast.unparse(d) or "numba" in ast.unparse(d) for d in getattr(node, "decorator_list", []))


def long_functions(root: str, limit: int = 60) -> list[str]:
    out = []
    for path in sorted(Path(root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not _numba(node):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path}:{node.lineno} {node.name} {n} lines")
    return out


if __name__ == "__main__":
    found = long_functions(sys.argv[1] if len(sys.argv) > 1 else "evgrid", int(sys.argv[2]) if len(sys.argv) > 2 else 60)
    print("\n".join(found) or "none")
    sys.exit(1 if found else 0)
