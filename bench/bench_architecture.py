"""The shape of the code, before and after the architecture issue, measured from the source.

For the tree at ``--before`` (a git revision, checked out in a temporary worktree) and for this
tree: the largest modules' line counts, the number of reaches into another module's underscore
names, import cycles (lazy imports counted), internal imports made inside functions, imports
against the layers, and a duplicate-code scan (the ``duplicates`` command, when it is on PATH).
The suite's wall times, measured separately on the same machine (``time make test``), are
recorded from ``--suite-before`` / ``--suite-after``.

    python bench/bench_architecture.py --before 4acf7b9 --suite-before 592 --suite-after 520

Writes ``bench/results/architecture.json`` and prints a markdown table.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import parser, result_path, write_result  # noqa: E402 - bench/ is on the path as the script's folder

from spherefmt.testing import architecture as A  # noqa: E402 - after the path above

#: why each group of lazy (in-function) internal imports is left, by importing module
LAZY_REASONS = {
    "spherefmt.cli": "each command imports what it runs: `sphere --help` loads no zarr, torch or runtime",
    "spherefmt.containers": "the vhd container loads when a .vhd is used: it needs the [vhd] extra (pyfatfs)",
    "spherefmt.containers.vhd.container": "pyfatfs (the [vhd] extra) loads when an image is opened",
    "spherefmt.testing.images": "pyfatfs (the [vhd] extra) loads when a test image is made",
    "spherefmt.backends": "backends are registered by name and imported when chosen (torch, wgpu are extras)",
    "spherefmt.convert": "`import spherefmt` does not load the runtime; co-activation placement does",
    "spherefmt.testing.reliability": "runs in the forked child that the trial kills",
}


def measure(root: Path) -> dict[str, Any]:
    mods = A.modules(root)
    g = A.graph(mods)
    lazy = [(m.name, i.line, i.target) for m in mods.values() for i in m.imports if i.lazy]
    by_module = Counter(n for n, _, _ in lazy)
    return {
        "modules": len(mods),
        "lines": sum(m.lines for m in mods.values()),
        "largest": {m.name: m.lines for m in sorted(mods.values(), key=lambda m: -m.lines)[:8]},
        "private_reaches": len(A.private_reaches(mods)),
        "private_reaches_by_module": dict(Counter(r.module for r in A.private_reaches(mods)).most_common()),
        "cycles": A.cycles(g),
        "imports_internal": sum(len(m.imports) for m in mods.values()),
        "imports_lazy": len(lazy),
        "imports_lazy_by_module": {k: {"count": v, "why": LAZY_REASONS.get(k)} for k, v in by_module.most_common()},
        "layer_violations": len(A.violations(mods)),
        "duplicates": duplicates(root),
    }


def duplicates(root: Path) -> str | None:
    tool = shutil.which("duplicates")
    if tool is None:
        return None
    r = subprocess.run([tool, "--repo", str(root), "--seconds", "120"], capture_output=True, text=True, timeout=300)
    return r.stdout.strip().splitlines()[0] if r.stdout.strip() else None


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--before", default="4acf7b9", help="git revision of the tree before (default: %(default)s)")
    ap.add_argument("--suite-before", type=float, help="seconds `make test` took on the tree before")
    ap.add_argument("--suite-after", type=float, help="seconds `make test` takes now")
    args = ap.parse_args(argv)
    if args.smoke:  # this tree on both sides: no worktree, no second scan
        before = measure(REPO)
        before["layer_violations"] = None
    else:
        before = _measure_revision(args.before)
    after = before if args.smoke else measure(REPO)
    doc = {"benchmark": "architecture", "command": "python bench/bench_architecture.py " + " ".join(argv or sys.argv[1:]),
           "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
           "before": {"revision": "HEAD" if args.smoke else args.before, **before}, "after": after,
           "suite_wall_s": {"before": args.suite_before, "after": args.suite_after}}
    write_result(result_path(args, "architecture"), doc)
    print(markdown(doc))
    return 0


def _measure_revision(rev: str) -> dict[str, Any]:
    """:func:`measure` on ``rev``, checked out in a temporary worktree."""
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), rev], check=True,
                       capture_output=True)
        try:
            before = measure(old)
            before["layer_violations"] = None  # the flat tree had no layers to point against
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)
    return before


def markdown(doc: dict[str, Any]) -> str:
    b, a = doc["before"], doc["after"]
    rows = [("modules", b["modules"], a["modules"]), ("lines", b["lines"], a["lines"]),
            ("largest module", f"{max(b['largest'].values())} ({max(b['largest'], key=b['largest'].get)})",
             f"{max(a['largest'].values())} ({max(a['largest'], key=a['largest'].get)})"),
            ("reaches into another module's privates", b["private_reaches"], a["private_reaches"]),
            ("import cycles (lazy imports counted)", len(b["cycles"]), len(a["cycles"])),
            ("internal imports inside functions", f"{b['imports_lazy']} of {b['imports_internal']}",
             f"{a['imports_lazy']} of {a['imports_internal']}"),
            ("imports against the layers", "no layers" if b["layer_violations"] is None else b["layer_violations"],
             a["layer_violations"]),
            ("duplicate-code scan (`duplicates`)", (b["duplicates"] or "-").split(", each")[0],
             (a["duplicates"] or "-").split(", each")[0])]
    s = doc["suite_wall_s"]
    if s["before"] and s["after"]:
        rows.append(("test suite wall time (pytest, 2 cores, same machine)", f"{s['before']:.0f} s", f"{s['after']:.0f} s"))
    lines = ["| | before | after |", "|---|---|---|"] + [f"| {k} | {x} | {y} |" for k, x, y in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
