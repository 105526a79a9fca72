"""Size limits of the house: no module over 500 lines, no class over 300, no function over 100.

``python scripts/check_sizes.py [paths...]`` (default ``bnfold``) prints each violation and exits 1
if there is any. Lines are physical lines of the file or of the definition (decorators included).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LIMITS = {"module": 500, "class": 300, "function": 100}


def violations(path: Path) -> list[str]:
    text = path.read_text()
    found = []
    lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    if lines > LIMITS["module"]:
        found.append(f"{path}: module has {lines} lines (limit {LIMITS['module']})")
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.ClassDef):
            kind = "class"
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            kind = "function"
        else:
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        size = (node.end_lineno or node.lineno) - first + 1
        if size > LIMITS[kind]:
            found.append(f"{path}:{first}: {kind} {node.name} has {size} lines (limit {LIMITS[kind]})")
    return found


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [Path("bnfold")]
    files = sorted(p for r in roots for p in ([r] if r.is_file() else r.rglob("*.py")))
    found = [v for f in files for v in violations(f)]
    print("\n".join(found) if found else f"sizes ok: {len(files)} files")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
