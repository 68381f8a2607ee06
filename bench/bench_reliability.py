"""Reliability of packages: writers killed with SIGKILL, writers racing, readers beside a writer,
and what the manifest's checks cost a full load (against version 1, side by side).

    .venv/bin/python bench/bench_reliability.py            # about 20 min on 2 cores
    .venv/bin/python bench/bench_reliability.py --quick    # a smoke test

* **Kills**: per container (directory, ``.zip``, ``.vhd``) and change (``grow``: 24 neurons in
  every layer of one cell; ``train``: one training step written back; ``convert``: a new model over
  an existing package), a writer is killed at a random moment of its change (uniform over 1.1x
  the time it takes).  Each outcome is the old state, the new state, neither, or an error.  Also
  what it left beside the package and inside it, right after the kill and after the next writer.
* **Writers racing**: processes writing their own experts of one package at the same time (each
  waits for the lock; on S3, which has none, each retries a refused commit); every write must
  be there at the end.
* **Readers beside a writer**: a reader streams cell layers (``Package.cell_layer``, what the
  runtime reads) while another process commits new versions of every expert; every read must
  succeed and hold one version of the expert.
* **Load**: ``open`` + ``state_dict(framework="torch")`` + a sum of every tensor, GPT-2-small
  shape, against the same with the last version-1 release of spherefmt (a git worktree) and
  against safetensors with one private copy, each in a fresh process, in the same run.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from common import machine, parser, result_path  # noqa: E402

CONTAINERS: tuple[str, ...] = (".sphere", ".zip", ".vhd")
KILL_OPS: tuple[str, ...] = ("grow", "train", "convert")
READ_CONTAINERS: tuple[str, ...] = (".sphere", ".vhd")
LOAD_DTYPES: tuple[str, ...] = ("BF16", "F32")


def smoke_sizes() -> None:
    """``--smoke``: one container, one change, one dtype (every step still runs)."""
    global CONTAINERS, KILL_OPS, READ_CONTAINERS, LOAD_DTYPES
    CONTAINERS, KILL_OPS, READ_CONTAINERS, LOAD_DTYPES = (".sphere",), ("train",), (".sphere",), ("F32",)
V1_COMMIT = "3b141cd"  # the last commit of format version 1


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- kills ---------------------------------------------------------------------------------------
def kills(tmp: Path, trials_n: int, seed: int) -> dict[str, Any]:
    import spherefmt
    from spherefmt.testing import gpt2_config, make_gpt2, save_hf_folder
    from spherefmt.testing.reliability import Trials, copy_package, state_of

    cfg = gpt2_config(n_layer=3, n_embd=64, vocab_size=80)
    src0, src1 = tmp / "src0", tmp / "src1"
    save_hf_folder(src0, make_gpt2(cfg, "F32", 0), cfg)
    save_hf_folder(src1, make_gpt2(cfg, "F32", 1), cfg)
    trials = Trials()
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    for suffix in CONTAINERS:
        base = tmp / f"base{suffix}"
        spherefmt.save(src0, base, graticule="2x2", depth=2)
        for op in KILL_OPS:
            args: dict[str, Any] = {"experts": [[0, 1, 0], [1, 0, 1]], "source": str(src1), "graticule": "2x2",
                                    "depth": 2}
            ref = copy_package(base, tmp / f"ref{suffix}")
            seconds = trials.run(op, ref, args, None)["seconds"]
            old, new = state_of(base), state_of(ref)
            rows = []
            for _ in range(trials_n):
                rows.append(trials.trial(op, base, tmp / f"t{suffix}", args, rng.uniform(0, seconds * 1.1), old, new))
            outcomes: dict[str, int] = {}
            for r in rows:
                outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
            summary = {
                "trials": len(rows), "change_seconds": round(seconds, 3), "outcomes": outcomes,
                "finished_before_kill": sum(r["finished"] for r in rows),
                "leftovers_after_kill": {
                    "trials_with_files_beside": sum(bool(r["leftovers_after_kill"]["beside"]) for r in rows),
                    "max_bytes_beside": max(r["leftovers_after_kill"]["beside_bytes"] for r in rows),
                    "trials_with_unlisted_objects_inside": sum(bool(r["leftovers_after_kill"]["inside"]) for r in rows),
                    "trials_with_lock_file": sum(r["leftovers_after_kill"]["lock"] for r in rows)},
                "leftovers_after_next_writer": {
                    "trials_with_files_beside": sum(bool(r["leftovers_after_next_writer"]["beside"]) for r in rows),
                    "trials_with_unlisted_objects_inside": sum(bool(r["leftovers_after_next_writer"]["inside"])
                                                               for r in rows),
                    "trials_with_lock_file": sum(r["leftovers_after_next_writer"]["lock"] for r in rows)},
                "next_writer_keeps_state": sum(r["next_writer_keeps_state"] for r in rows),
                "examples_not_old_or_new": [r for r in rows if r["outcome"] not in ("old", "new")][:3],
            }
            out[f"{suffix.lstrip('.')}/{op}"] = summary
            log(f"kills {suffix} {op}: {outcomes} (change {seconds:.2f} s)")
    return out


# --- writers racing ------------------------------------------------------------------------------
RACER = r"""
import sys, time, numpy as np, spherefmt
from spherefmt.errors import ConcurrentWriteError
url, me, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
refused = 0
for r in range(1, rounds + 1):
    while True:
        try:
            with spherefmt.open(url, "r+", lock_timeout=120) as p:
                a = list(p.experts())[me]
                e = p.expert(*a)
                rows = e.neurons.copy()
                rows[e.index >= 0] = r
                p.write_expert(*a, rows)
            break
        except ConcurrentWriteError:
            refused += 1
            time.sleep(0.01 * (me + 1))
print(refused)
"""


def racing(tmp: Path, writers: int, rounds: int, s3: bool) -> dict[str, Any]:
    import numpy as np

    import spherefmt
    from spherefmt.testing import gpt2_config, make_gpt2

    cfg = gpt2_config(n_layer=3, n_embd=64, vocab_size=80)
    sd = make_gpt2(cfg, "F32", 0)
    targets = [str(tmp / f"race{s}") for s in CONTAINERS]
    server = None
    if s3:
        from spherefmt.testing.s3 import S3Server

        server = S3Server()
        server.use("race")
        targets.append("s3://race/pkg")
    out: dict[str, Any] = {}
    try:
        for url in targets:
            spherefmt.save(sd, url, config=cfg, graticule="2x2", depth=2)
            t0 = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, "-c", RACER, url, str(i), str(rounds)], stdout=subprocess.PIPE,
                                      text=True) for i in range(writers)]
            refused = [int(p.communicate(timeout=900)[0].strip() or 0) for p in procs]
            codes = [p.returncode for p in procs]
            seconds = time.perf_counter() - t0
            with spherefmt.open(url) as p:
                addrs = list(p.experts())[:writers]
                lost = 0
                for a in addrs:
                    e = p.expert(*a)
                    lost += int(not np.all(e.neurons[e.index >= 0] == rounds))
                v = p.verify()
                gen = p.generation
            kind = "s3" if url.startswith("s3://") else Path(url).suffix.lstrip(".")
            out[kind] = {"writers": writers, "commits_each": rounds, "exit_codes": codes, "seconds": round(seconds, 2),
                         "generation_at_end": gen, "experts_lost": lost, "commits_refused_and_retried": sum(refused),
                         "verify_ok": not v["missing"] and not v["mismatched"]}
            log(f"racing {kind}: {out[kind]}")
    finally:
        if server is not None:
            server.kill()
    return out


# --- readers beside a writer ------------------------------------------------------------------------
REWRITER = r"""
import sys, numpy as np, spherefmt
pkg = spherefmt.open(sys.argv[1], "r+")
addrs = list(pkg.experts())
base = {a: pkg.expert(*a) for a in addrs}
print("ready", flush=True)
k = 0
while True:
    k += 1
    with pkg.transaction():
        for a in addrs:
            e = base[a]
            rows = e.neurons.copy()
            rows[e.index >= 0] = k
            pkg.write_expert(*a, rows)
"""


def readers(tmp: Path, seconds: float) -> dict[str, Any]:
    import numpy as np

    import spherefmt
    from spherefmt.errors import SpherefmtError
    from spherefmt.testing import llama_config, make_llama

    cfg = llama_config(num_hidden_layers=3, hidden_size=64, intermediate_size=176)
    sd = make_llama(cfg, "F32", 0)
    out: dict[str, Any] = {}
    for suffix in READ_CONTAINERS:
        url = spherefmt.save(sd, tmp / f"read{suffix}", config=cfg, graticule="2x2", depth=2)
        with spherefmt.open(url) as p:
            original = {(layer, a, b): p.cell_layer(a, b, layer)[0].tobytes()
                        for layer in range(len(p.layer_depth)) for a in range(2) for b in range(2)}
        child = subprocess.Popen([sys.executable, "-c", REWRITER, url], stdout=subprocess.PIPE, text=True)
        reads = failed = mixed = 0
        errors: dict[str, int] = {}
        versions: set[float] = set()
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            t_end = time.monotonic() + seconds
            with spherefmt.open(url) as p:
                n_layers = len(p.layer_depth)
                while time.monotonic() < t_end:
                    for layer in range(n_layers):
                        for a in range(2):
                            for b in range(2):
                                reads += 1
                                try:
                                    rows, index, _ = p.cell_layer(a, b, layer)
                                except SpherefmtError as e:
                                    failed += 1
                                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                                    continue
                                if rows.tobytes() == original[layer, a, b]:
                                    continue
                                v = np.unique(rows[index >= 0])
                                if v.size != 1:
                                    mixed += 1
                                else:
                                    versions.add(float(v[0]))
                gen = p.generation
        finally:
            child.kill()
            child.wait()
        kind = suffix.lstrip(".")
        out[kind] = {"seconds": seconds, "reads": reads, "failed": failed, "errors": errors, "mixed": mixed,
                     "versions_seen": len(versions), "reader_generation_at_end": gen}
        log(f"readers {kind}: {out[kind]}")
    return out


# --- load against version 1 ------------------------------------------------------------------------
LOADER = r"""
import gc, json, sys, time
sys.path.insert(0, sys.argv[1])
import torch, spherefmt
from safetensors.torch import load_file
kind, path, runs = sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(2)
def once():
    t0 = time.perf_counter()
    if kind == "safetensors+copy":
        sd = {k: v.clone() for k, v in load_file(path).items()}
    else:
        with spherefmt.open(path) as p:
            sd = p.state_dict(framework="torch")
    total = sum(float(t.sum()) for t in sd.values())
    dt = time.perf_counter() - t0
    del sd
    gc.collect()
    return dt
once()
ts = sorted(once() for _ in range(runs))
print(json.dumps({"median_s": ts[len(ts) // 2], "runs_s": [round(t, 4) for t in ts], "spherefmt": spherefmt.__file__}))
"""


def load(tmp: Path, runs: int, quick: bool) -> dict[str, Any]:
    from spherefmt.testing import gpt2_config, make_gpt2, save_hf_folder

    v1 = tmp / "v1tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(v1), V1_COMMIT], check=True,
                   capture_output=True)
    try:
        cfg = gpt2_config(n_layer=2, n_embd=128, vocab_size=1000) if quick else \
            gpt2_config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
        out: dict[str, Any] = {"model": "GPT-2-small shape" if not quick else "tiny", "rows": {}}
        for dtype in LOAD_DTYPES:
            src = tmp / f"hf-{dtype}"
            save_hf_folder(src, make_gpt2(cfg, dtype, 0), cfg)
            rows: dict[str, Any] = {}
            for codec in ("none", "default"):
                for version, code in (("v1", str(v1)), ("v2", str(REPO))):
                    pkg = tmp / f"{version}-{dtype}-{codec}.sphere"
                    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {code!r}); import spherefmt; "
                                    f"spherefmt.save({str(src)!r}, {str(pkg)!r}, codec={codec!r})"], check=True)
                    r = subprocess.run([sys.executable, "-c", LOADER, code, "sphere", str(pkg), str(runs)], check=True,
                                       capture_output=True, text=True)
                    rows[f"{version}/{codec}"] = json.loads(r.stdout.strip().splitlines()[-1])
                    # which code ran, without this machine's paths
                    rows[f"{version}/{codec}"]["spherefmt"] = "the version-1 worktree" if version == "v1" else "this tree"
            r = subprocess.run([sys.executable, "-c", LOADER, str(REPO), "safetensors+copy",
                                str(src / "model.safetensors"), str(runs)], check=True, capture_output=True, text=True)
            rows["safetensors+copy"] = json.loads(r.stdout.strip().splitlines()[-1])
            rows["safetensors+copy"]["spherefmt"] = "this tree"
            for codec in ("none", "default"):
                rows[f"v2_over_v1/{codec}"] = round(rows[f"v2/{codec}"]["median_s"] / rows[f"v1/{codec}"]["median_s"], 3)
                rows[f"v2_over_one_copy/{codec}"] = round(rows[f"v2/{codec}"]["median_s"]
                                                          / rows["safetensors+copy"]["median_s"], 3)
            out["rows"][dtype] = rows
            log(f"load {dtype}: " + ", ".join(f"{k} {v['median_s']:.3f}" if isinstance(v, dict) else f"{k} {v}"
                                              for k, v in rows.items()))
        return out
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(v1)], check=False,
                       capture_output=True)


def fuzz_targets(cases: int, seed: int, targets: list[str] | None = None) -> dict[str, Any]:
    """Hostile files: :mod:`spherefmt.testing.fuzz` on every parser and container (or ``targets``)."""
    from spherefmt.testing.fuzz import TARGETS, fuzz

    log(f"fuzz: {cases} mutations per target (exit-noise: a fifth, each case a fresh `sphere` process)")
    out: dict[str, Any] = {}
    for name in targets or list(TARGETS):
        (r,) = fuzz([name], max(1, cases // 5) if name == "exit-noise" else cases, seed)
        out[name] = r
    return out


def fuzz_goals(f: dict[str, Any]) -> dict[str, bool]:
    return {"fuzz_no_tracebacks": all(r["traceback"] == 0 for r in f.values()),
            "fuzz_no_hangs": all(r["hang"] == 0 for r in f.values()),
            "fuzz_no_wrong_data": all(r["wrong"] == 0 for r in f.values()),
            "fuzz_every_error_one_line": all(r.get("error_lines") == 1 for r in f.values() if r["clean"]),
            "fuzz_memory_within_2x_input_plus_256mib": all(
                r["peak_rss_above_baseline_mib"] is not None
                and r["peak_rss_above_baseline_mib"] <= 2 * r["input_bytes"] / 2**20 + 256 for r in f.values())}


def only_fuzz(args: Any) -> int:
    out = args.out or REPO / "bench" / "results" / "reliability.json"
    doc: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"benchmark": "bench/bench_reliability.py"}
    doc["fuzz"] = fuzz_targets(args.fuzz_cases, args.seed)
    doc.setdefault("goals", {}).update(fuzz_goals(doc["fuzz"]))
    doc["fuzz_command"] = " ".join([".venv/bin/python", "bench/bench_reliability.py", "--only-fuzz",
                                    f"--fuzz-cases {args.fuzz_cases}", f"--seed {args.seed}"])
    out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {out}")
    print(markdown(doc))
    return 0


def markdown(doc: dict[str, Any]) -> str:
    lines = ["| container / change | trials | old | new | other | files beside after kill | left after next writer |",
             "|---|---:|---:|---:|---:|---|---|"]
    for k, v in doc["kills"].items():
        o = v["outcomes"]
        other = v["trials"] - o.get("old", 0) - o.get("new", 0)
        la, ln = v["leftovers_after_kill"], v["leftovers_after_next_writer"]
        lines.append(f"| {k} | {v['trials']} | {o.get('old', 0)} | {o.get('new', 0)} | {other} | "
                     f"{la['trials_with_files_beside']} (max {la['max_bytes_beside'] / 1024:.0f} KiB), "
                     f"lock file {la['trials_with_lock_file']} | "
                     f"{ln['trials_with_files_beside'] + ln['trials_with_unlisted_objects_inside']} |")
    lines += ["", "| racing writers | writers x commits | lost | refused and retried | verify |", "|---|---|---:|---:|---|"]
    for k, v in doc["racing"].items():
        lines.append(f"| {k} | {v['writers']} x {v['commits_each']} | {v['experts_lost']} | "
                     f"{v['commits_refused_and_retried']} | {'ok' if v['verify_ok'] else 'FAILED'} |")
    lines += ["", "| readers beside a writer | reads | failed | mixed | versions seen |", "|---|---:|---:|---:|---:|"]
    for k, v in doc["readers"].items():
        lines.append(f"| {k} | {v['reads']} | {v['failed']} | {v['mixed']} | {v['versions_seen']} |")
    if doc.get("fuzz"):
        lines += ["", "| fuzz target | cases | one-line errors | read the same | tracebacks | hangs | wrong data | "
                  "most error lines | peak memory above baseline (input) |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for k, r in doc["fuzz"].items():
            lines.append(f"| {k} | {r['cases']} | {r['clean']} | {r['same']} | {r['traceback']} | {r['hang']} | "
                         f"{r['wrong']} | {r.get('error_lines', '-')} | {r['peak_rss_above_baseline_mib']} MiB "
                         f"({r['input_bytes'] / 1024:.0f} KiB) |")
    if doc.get("load"):
        lines += ["", "| load (open + state_dict + sum) | v1 s | v2 s | v2 / v1 | v2 / safetensors + one copy |",
                  "|---|---:|---:|---:|---:|"]
        for dtype, rows in doc["load"]["rows"].items():
            for codec in ("none", "default"):
                lines.append(f"| {dtype} `{codec}` | {rows[f'v1/{codec}']['median_s']:.3f} | "
                             f"{rows[f'v2/{codec}']['median_s']:.3f} | {rows[f'v2_over_v1/{codec}']} | "
                             f"{rows[f'v2_over_one_copy/{codec}']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="a few trials of each, a tiny model for the load")
    ap.add_argument("--trials", type=int, default=50, help="SIGKILL trials per container and change (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fuzz-cases", type=int, default=500, help="mutations per fuzz target (default 500)")
    ap.add_argument("--only-fuzz", action="store_true",
                    help="run only the fuzz targets and merge them into the existing results")
    args = ap.parse_args(argv)
    if args.only_fuzz:
        return only_fuzz(args)
    if args.smoke:  # one trial of each kind, a few fuzz cases
        args.quick, args.trials, args.fuzz_cases = True, 1, 5
        smoke_sizes()
    n = args.trials if args.smoke else 3 if args.quick else args.trials
    out = result_path(args, "reliability")
    tmp = Path(tempfile.mkdtemp(prefix="spherefmt-reliability-"))
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"benchmark": "bench/bench_reliability.py",
                           "command": " ".join([".venv/bin/python", "bench/bench_reliability.py", *(argv or sys.argv[1:])]),
                           "machine": machine()}
    try:
        doc["kills"] = kills(tmp, n, args.seed)
        doc["racing"] = racing(tmp, 2 if args.smoke else 3, 1 if args.smoke else 3 if args.quick else 10,
                               s3=not args.smoke)
        doc["readers"] = readers(tmp, 1 if args.smoke else 3 if args.quick else 15)
        doc["load"] = load(tmp, 1 if args.smoke else 3 if args.quick else 5, args.quick)
        doc["fuzz"] = fuzz_targets(args.fuzz_cases if args.smoke else 20 if args.quick else args.fuzz_cases, args.seed,
                                   ["safetensors"] if args.smoke else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    doc["goals"] = {
        "kills_every_one_old_or_new": all(v["outcomes"].get("old", 0) + v["outcomes"].get("new", 0) == v["trials"]
                                          for v in doc["kills"].values()),
        "no_leftovers_after_next_writer": all(v["leftovers_after_next_writer"]["trials_with_files_beside"] == 0
                                              and v["leftovers_after_next_writer"]["trials_with_unlisted_objects_inside"] == 0
                                              for v in doc["kills"].values()),
        "racing_nothing_lost": all(v["experts_lost"] == 0 and v["verify_ok"] for v in doc["racing"].values()),
        "readers_every_read_consistent": all(v["failed"] == 0 and v["mixed"] == 0 for v in doc["readers"].values()),
        "load_no_slower_than_v1": all(rows[f"v2_over_v1/{c}"] <= 1.05 for rows in doc["load"]["rows"].values()
                                      for c in ("none", "default")),
        "load_codec_none_within_1_5x_one_copy": all(rows["v2_over_one_copy/none"] <= 1.5
                                                    for rows in doc["load"]["rows"].values()),
    }
    doc["goals"].update(fuzz_goals(doc["fuzz"]))
    doc["total_s"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {out}")
    print(markdown(doc))
    print(json.dumps(doc["goals"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
