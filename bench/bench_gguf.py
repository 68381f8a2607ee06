"""GGUF import and export against copying the file, in one run.

A Llama-shaped GGUF written by the ``gguf`` package (8 layers, width 1024, FFN 2816, vocabulary
32000: F16 embeddings, Q8_0 head, F32 attention and FFN; random weights made locally), and the
same with Q8_0 FFN tensors.  Import: ``sphere convert`` (the FFN onto the sphere; a quantized
one onto a Q8_0 sphere, quantized again), default codec and ``--codec none``.  Export: back to
``.gguf``, checked byte-identical to the original, and tensor by tensor (a quantized FFN's
``ffn_down`` is quantized again along the neurons: the tensors whose bytes differ are counted and
the recorded change of the FFN values is reported).  Results: ``bench/results/gguf.json``.

    .venv/bin/python bench/bench_gguf.py
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import parser, result_path, write_result  # bench/common.py (this script's folder is on the path)

import spherefmt
from spherefmt.testing.gguf import make_llama_gguf

HERE = Path(__file__).resolve().parent


def timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    args = parser(__doc__).parse_args()
    shape = dict(layers=2, d=256, ff=512, vocab=512) if args.smoke else dict(layers=8, d=1024, ff=2816, vocab=32000)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=HERE / "out" if (HERE / "out").is_dir() else None) as tmp_name:
        tmp = Path(tmp_name)
        for quant in (False, True):
            src = make_llama_gguf(tmp / "m.gguf", **shape, quantized_ffn=quant)
            size = src.stat().st_size
            copy_s = timed(lambda src=src: shutil.copyfile(src, tmp / "copy.gguf"))
            for codec in ("default", "none"):
                pkg = tmp / f"m-{codec}.sphere"
                conv_s = timed(lambda src=src, pkg=pkg, codec=codec: spherefmt.save(src, pkg, codec=codec))
                out = tmp / "back.gguf"
                exp_s = timed(lambda pkg=pkg, out=out: spherefmt.export(pkg, out))
                same = out.read_bytes() == src.read_bytes()
                import gguf
                import numpy as np

                a = {t.name: bytes(np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(src).tensors}
                b = {t.name: bytes(np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(out).tensors}
                differ = sorted({n.split(".", 2)[-1] for n in a if a[n] != b.get(n)})
                stored = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
                with spherefmt.open(pkg) as p:
                    arch = p.architecture
                    change = p.header.metadata.get("spherefmt.quantization_rel_rms")
                rows.append({"ffn": "Q8_0" if quant else "F32", "codec": codec, "gguf_bytes": size,
                             "package_bytes": stored, "architecture": arch, "copy_s": copy_s, "import_s": conv_s,
                             "export_s": exp_s, "import_over_copy": conv_s / copy_s, "export_over_copy": exp_s / copy_s,
                             "export_identical": same, "tensors_differing": differ,
                             "ffn_rel_rms_change": None if change is None else float(change)})
                print(f"FFN {rows[-1]['ffn']}, codec {codec}: {size / 2**20:.0f} MiB; copy {copy_s:.2f}s, import "
                      f"{conv_s:.2f}s, export {exp_s:.2f}s; identical {same} (differ: {differ}, change {change}); "
                      f"package {stored / 2**20:.0f} MiB ({arch})",
                      flush=True)
                shutil.rmtree(pkg)
                out.unlink()
            src.unlink()
    write_result(result_path(args, "gguf"), {"benchmark": "gguf", "rows": rows})


if __name__ == "__main__":
    main()
