"""Fail when modules of the given packages import each other in a circle (directly or
through others), TYPE_CHECKING and function-local imports included: `make lint` runs it on
mqttd and persistence. import-linter's layer contracts (pyproject.toml) order the packages;
this covers every module, inside packages too.

    python -m tools.import_cycles mqttd persistence
"""

from __future__ import annotations

import sys

import grimp


def cycles(graph: grimp.ImportGraph, prefixes: tuple[str, ...]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    modules = sorted(m for m in graph.modules if m.startswith(prefixes))
    edges = {
        m: sorted(w for w in graph.find_modules_directly_imported_by(m) if w.startswith(prefixes))
        for m in modules
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, child = work.pop()
            if child == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            for position in range(child, len(edges[node])):
                nxt = edges[node][position]
                if nxt not in index:
                    work.append((node, position + 1))
                    work.append((nxt, 0))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
    return found


def main(argv: list[str]) -> int:
    packages = tuple(argv) or ("mqttd",)
    graph = grimp.build_graph(*packages, include_external_packages=False)
    found = cycles(graph, tuple(f"{p}." for p in packages) + packages)
    for component in found:
        print("import cycle:", " <-> ".join(component))
        for module in component:
            for imported in graph.find_modules_directly_imported_by(module):
                if imported in component:
                    print(f"    {module} -> {imported}")
    if not found:
        print(f"no import cycles in {', '.join(packages)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
