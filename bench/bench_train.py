"""Writing back after training: bytes written and wall time of ``save_changes()`` after changing
1, 10 and 100% of the experts, against re-saving the whole model as safetensors, in one run.
Then growth (``sphere grow``): bytes written and time of adding neurons to one expert, to every
layer, and adding a layer, against a safetensors re-save of the grown model.

GPT-2-small-shaped model (124M parameters, bf16, random weights made locally), directory
package with the default codec.  "Training" is a deterministic perturbation of the chosen
experts' FFN rows (the write-back cost does not depend on how the values changed).
Results: ``bench/results/train.json``.

    .venv/bin/python bench/bench_train.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import parser, result_path, write_result  # bench/common.py (this script's folder is on the path)

import spherefmt
import spherefmt.training.modules as st
from spherefmt.testing import gpt2_config, make_gpt2, save_hf_folder

HERE = Path(__file__).resolve().parent


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    args = parser(__doc__).parse_args()
    cfg = gpt2_config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    if args.smoke:
        cfg = gpt2_config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        save_hf_folder(tmp / "src", make_gpt2(cfg, "BF16", 0), cfg)
        for share in (0.01, 0.10, 1.0):
            pkg = tmp / f"m{share}.sphere"
            spherefmt.save(tmp / "src", pkg)
            with spherefmt.open(pkg) as p0:
                experts = list(p0.experts())
            chosen = experts[: max(1, round(share * len(experts)))]
            m = st.load(pkg, trainable=chosen)
            with torch.no_grad():  # move every neuron of the chosen experts
                for lat, lon, depth in chosen:
                    _, index, _ = m.pkg.shell_arrays(depth)
                    for t, layer in enumerate(m.pkg.shells[depth].layers):
                        idx = torch.from_numpy(index[t, lat, lon][index[t, lat, lon] >= 0].astype(np.int64))
                        w = m.parameter_for(m.pkg.layout.layers[layer]["w_in"])
                        w[:, idx] += 0.01
            before = dir_bytes(pkg)
            t0 = time.perf_counter()
            written = m.save_changes()
            secs = time.perf_counter() - t0
            sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in m.model.state_dict().items()
                  if k != "lm_head.weight"}
            t0 = time.perf_counter()
            from safetensors.torch import save_file

            save_file(sd, str(tmp / "full.safetensors"))
            st_secs = time.perf_counter() - t0
            st_bytes = (tmp / "full.safetensors").stat().st_size
            m.pkg.close()
            rows.append({"experts_changed": len(written["experts"]), "experts_total": len(experts),
                         "share": share, "save_changes_s": secs, "save_changes_bytes": written["bytes"],
                         "package_bytes_before": before, "safetensors_resave_s": st_secs,
                         "safetensors_bytes": st_bytes})
            r = rows[-1]
            print(f"{share:>5.0%}: {r['experts_changed']:>3}/{r['experts_total']} experts, save_changes "
                  f"{secs:.2f}s {written['bytes'] / 2**20:.1f} MiB raw; safetensors re-save {st_secs:.2f}s "
                  f"{st_bytes / 2**20:.0f} MiB", flush=True)
        growth = grow_rows(tmp)
    write_result(result_path(args, "train"), {"benchmark": "train", "rows": rows, "growth": growth})


def _snapshot(p: Path) -> dict[str, tuple[int, int]]:
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file()}


def grow_rows(tmp: Path) -> list[dict]:
    from safetensors.numpy import save_file

    from spherefmt.training.grow import grow_layers, grow_neurons

    pkg = tmp / "grow.sphere"
    spherefmt.save(tmp / "src", pkg)
    out = []
    for what, fn in (("+64 neurons in one expert (every layer of its shell)",
                      lambda: grow_neurons(str(pkg), 64, cell=(0, 0), depth=0)),
                     ("+31 neurons in every layer (1%), spread", lambda: grow_neurons(str(pkg), 31)),
                     ("+1 layer (identity block)", lambda: grow_layers(str(pkg), 1))):
        before = _snapshot(pkg)
        t0 = time.perf_counter()
        fn()
        secs = time.perf_counter() - t0
        after = _snapshot(pkg)
        written = sum(size for f, (size, mt) in after.items() if before.get(f) != (size, mt))
        with spherefmt.open(pkg) as p:
            t0 = time.perf_counter()
            sd = {k: np.ascontiguousarray(p.tensor(k, padded=True)) for k in p.keys()}
            read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        save_file(sd, str(tmp / "grown.safetensors"))
        st_secs = time.perf_counter() - t0
        st_bytes = (tmp / "grown.safetensors").stat().st_size
        del sd
        out.append({"growth": what, "grow_s": secs, "bytes_written": written, "package_bytes": dir_bytes(pkg),
                    "safetensors_resave_s": st_secs, "safetensors_bytes": st_bytes, "read_for_resave_s": read_s})
        print(f"{what}: {secs:.2f}s, {written / 2**20:.1f} MiB written; safetensors re-save {st_secs:.2f}s "
              f"{st_bytes / 2**20:.0f} MiB", flush=True)
    return out


if __name__ == "__main__":
    main()
