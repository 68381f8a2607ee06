"""The shape of the code: layers point one way, no import cycles, no reaching into privates.

Every module's imports are parsed (top level, inside functions, and under ``TYPE_CHECKING``) by
:mod:`spherefmt.testing.architecture`; the layers are

* ground: ``errors``, ``constants``, ``units``, ``dtypes``, ``progress`` (import nothing else);
* the format: ``format/``, ``containers/``, ``interop/`` (never the runtime, backends, training);
* ``backends/``: only the ground;
* ``runtime/``: the format and the backends;
* on top: ``training/``, the CLI, the demo, pictures, ``testing/``.
"""

from __future__ import annotations

import ast
import textwrap

from spherefmt.testing import architecture as A


def test_every_import_points_down_the_layers():
    bad = A.violations(A.modules())
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_cycles_lazy_imports_counted():
    assert A.cycles(A.graph(A.modules(), typing=False)) == []


def test_nothing_reaches_into_another_modules_private_members():
    reaches = A.private_reaches(A.modules())
    assert not reaches, "\n".join(f"{r.module}:{r.line} uses {r.name}" for r in reaches)


def test_backends_and_runtime_use_absolute_imports():
    # ``from ..errors import X`` inside a top-level folder resolves only once installed
    for mod in A.modules().values():
        if mod.name.startswith(("spherefmt.backends", "spherefmt.runtime")):
            rel = [n.lineno for n in ast.walk(mod.tree) if isinstance(n, ast.ImportFrom) and n.level]
            assert not rel, f"{mod.path}: relative imports on lines {rel}"


def test_the_checker_sees_what_it_must(tmp_path):
    """The checks above could pass by seeing nothing: run them on a small tree with one of each
    fault (a format module importing the runtime inside a function, a cycle, a private reach)."""
    files = {
        "spherefmt/__init__.py": "",
        "spherefmt/errors.py": "class E(Exception):\n    pass\n",
        "spherefmt/format/__init__.py": "",
        "spherefmt/format/a.py": """
            from spherefmt.format import b

            def f():
                from spherefmt.runtime.s import Session
                return Session, b.g()._hidden
        """,
        "spherefmt/format/b.py": """
            from spherefmt.format.a import f

            def g():
                return f
        """,
        "runtime/__init__.py": "",
        "runtime/s.py": "from ..errors import E\n\nclass Session:\n    pass\n",
        "backends/__init__.py": "",
    }
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    mods = A.modules(tmp_path)
    assert set(mods) >= {"spherefmt.format.a", "spherefmt.runtime.s"}
    bad = A.violations(mods)
    assert len(bad) == 1 and bad[0].startswith("spherefmt/format/a.py:5: ") and "spherefmt.format.a (format) imports spherefmt.runtime.s (runtime)" in bad[0]
    assert A.cycles(A.graph(mods)) == [["spherefmt.format.a", "spherefmt.format.b"]]
    assert [r.name for r in A.private_reaches(mods)] == ["_hidden"]
    lazy = [i for i in mods["spherefmt.format.a"].imports if i.lazy]
    assert [i.target for i in lazy] == ["spherefmt.runtime.s"]
    assert [i.target for i in mods["spherefmt.runtime.s"].imports] == ["spherefmt.errors"]
