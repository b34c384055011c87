"""Draw the import graph of diffusers_mixdq's top-level parts as a Mermaid flowchart (stdout).

    python tools/import_graph.py            # Mermaid text, paste into docs or a Markdown viewer
    python tools/import_graph.py --check    # exit 1 if two parts import each other (an import cycle)

Imports inside functions count too. Needs grimp (in the ``test`` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grimp

ROOT = "diffusers_mixdq"


def edges(graph) -> set[tuple[str, str]]:
    parts = sorted(graph.find_children(ROOT))
    found = set()
    for a in parts:
        for b in parts:
            if a != b and graph.direct_import_exists(importer=a, imported=b, as_packages=True):
                found.add((a.split(".")[-1], b.split(".")[-1]))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on parts that import each other")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    found = edges(grimp.build_graph(ROOT, include_external_packages=False))
    cycles = sorted((a, b) for a, b in found if (b, a) in found and a < b)
    if args.check:
        for a, b in cycles:
            print(f"{a} <-> {b}")
        return 1 if cycles else 0
    print("flowchart LR")
    for a, b in sorted(found):
        print(f"    {a} --> {b}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
