"""The ``sphere`` command line: convert, info, cell, export.

User errors (bad input, a taken destination, a missing expert) print one line ``sphere: error:
...`` to stderr and exit with code 2; informational commands take ``--json``.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import click
import numpy as np

from spherefmt import constants as C
from spherefmt.errors import InputError, SpherefmtError
from spherefmt.units import format_size as _size
from spherefmt.units import parse_size

if TYPE_CHECKING:  # the CLI imports its commands' modules lazily: `sphere --help` stays fast
    from spherefmt.format.package import Package

__all__ = ["main", "cli", "package_info"]


def _settle_async_work() -> None:
    """After an error: cancel and await what is left on zarr's event loop, quietly.  A read that
    fails in one chunk of a batch leaves its sibling tasks pending (or failed, unretrieved);
    without this, interpreter exit prints "Task was destroyed but it is pending!" and their
    tracebacks by the hundred under the one-line error."""
    import asyncio

    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    sync = sys.modules.get("zarr.core.sync")
    loop = None if sync is None else sync.loop[0]
    if loop is None or loop.is_closed():
        return
    # what is left belongs to the error just reported (also for tasks other threads start later)
    loop.set_exception_handler(lambda _loop, _context: None)

    async def cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout=10)
    except Exception:  # noqa: BLE001 - a stopped or busy loop: the exception handler above still applies
        pass


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (SpherefmtError, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            click.echo(f"sphere: error: {msg}", err=True)
            _settle_async_work()
            sys.exit(2)

    return wrapper


def package_info(pkg: Package) -> dict[str, Any]:
    """The summary ``sphere info`` prints (also its ``--json`` document)."""
    h = pkg.header
    raw = sum(pkg.tensor_info(n).nbytes for n in pkg.keys())
    core_raw = sum(pkg.tensor_info(n).nbytes for n in pkg.keys() if pkg.entry(n).where == "core")
    out: dict[str, Any] = {
        "package": pkg.where,
        "format": C.FORMAT_NAME,
        "version": h.version,
        "generation": pkg.generation,
        "architecture": h.architecture,
        "tensors": len(h.tensors),
        "codec": h.codec,
        "raw_bytes": raw,
        "stored_bytes": pkg.stored_bytes(),
        "core": {"tensors": sum(t.where == "core" for t in h.tensors), "raw_bytes": core_raw,
                 "stored_bytes": pkg.stored_bytes(C.CORE_GROUP)},
        "files": list(h.files),
        "warning": h.warning,
    }
    out["ratio"] = out["stored_bytes"] / raw if raw else 1.0
    if h.graticule is not None and h.neuron_layout is not None:
        p, m = h.graticule
        nl = h.neuron_layout
        out.update({
            "layers": len(h.layers),
            "neurons_per_layer": [lay.neurons for lay in h.layers],
            "graticule": [p, m],
            "depth": h.depth,
            "layer_depth": list(h.layer_depth),
            "shells": [s.to_json() for s in h.shells],
            "experts": p * m * h.depth,
            "neuron_row": {"dtype": nl.dtype, "width": nl.row_width, "fields": {f.name: f.width for f in nl.fields}},
            "placement": h.placement,
            "sphere": {"raw_bytes": raw - core_raw, "stored_bytes": pkg.stored_bytes(C.SPHERE_GROUP)},
        })
        if h.experts is not None:  # the model's own experts, one cell each, routed by its own router
            cfg = h.config or {}
            where: list[list[list[int]]] = [[[] for _ in range(h.experts["count"])] for _ in h.layers]
            for depth in range(h.depth):  # each expert's cell address, for sphere train --experts
                _, index, _ = pkg.shell_arrays(depth)
                for t, layer in enumerate(pkg.shell_layers(depth)):
                    for lat, lon in zip(*np.nonzero((index[t] >= 0).any(axis=-1)), strict=True):
                        e = int(index[t, lat, lon].max()) // h.experts["neurons"]
                        if 0 <= e < h.experts["count"]:
                            where[layer][e] = [int(lat), int(lon), depth]
            out["native_experts"] = {"per_layer": h.experts["count"], "neurons": h.experts["neurons"],
                                     "top_k": cfg.get("num_experts_per_tok"),
                                     "shared_expert": any(".shared_expert." in t.name for t in h.tensors),
                                     "cells": where}
        if h.quantization is not None:
            out["quantization"] = {"type": h.quantization["type"], "sphere": h.quantization["sphere"],
                                   "core_tensors": len(h.quantization["core"]),
                                   "types": dict(h.quantization.get("types") or {})}
            change = h.metadata.get("spherefmt.quantization_rel_rms")
            if change is not None:  # what quantizing moved the neuron rows' values (spec 9.1)
                out["quantization"]["sphere_rel_rms_change"] = float(change)
        if h.routing is not None:  # sphere sparsify (spec 7.3)
            out["routing"] = {"always_on_cells": [len(c) for c in h.routing["always_on"]],
                              "always_on": h.routing["always_on"], "trained": h.routing.get("trained")}
        from spherefmt.format.routers import read_router, router_names

        routers = {}
        for name in router_names(pkg):
            try:
                meta = read_router(pkg, name).meta
                routers[name] = {k: v for k, v in meta.items() if k != "placement_quality"}
                q = meta.get("placement_quality")
                if q:  # measured on the router's training text
                    out["placement_quality"] = q
            except SpherefmtError as e:
                routers[name] = {"error": str(e)}
        out["routers"] = routers
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spherefmt")
@click.option("-v", "--verbose", is_flag=True, help="Show the GPU libraries' own log messages (wgpu, Mesa).")
def cli(verbose: bool) -> None:
    """spherefmt: transformer FFN neurons on a sphere, in a chunked, compressed Zarr package.

    \b
    Quick start:
      sphere convert gpt2-folder/ model.sphere      # HF folder, .safetensors, .pt/.bin
      sphere info model.sphere
      sphere cell model.sphere 1 2 0                # expert (lat=1, lon=2, depth=0)
      sphere export model.sphere back.safetensors   # bit for bit (or .gguf for GGUF sources)
      sphere grow model.sphere --neurons 64         # function-preserving, in place
      sphere run model.sphere --prompt "def " --budget 25%   # streaming inference
      sphere route-train model.sphere --text sample.txt       # a learned top-k router
      sphere sparsify model.sphere --text domain.txt         # train top-k routing into the model
      sphere map model.sphere -o map.png                      # the graticule as world maps
      sphere verify model.sphere                              # every object against the manifest
    """
    if verbose:  # the Vulkan backend keeps wgpu's own log quiet unless this is set
        import os

        os.environ["SPHEREFMT_VERBOSE"] = "1"


@cli.command()
@click.argument("src")
@click.argument("dst")
@click.option("--graticule", metavar="PxM|earth", help="Parallels x meridians, e.g. 18x36, or 'earth' (180x360). "
              "Default adapts to the model so one cell of one layer is >= 256 KiB.")
@click.option("--depth", type=int, help=f"Depth shells 1..{C.MAX_DEPTH}. Default min(10, layers).")
@click.option("--codec", type=click.Choice(C.CODEC_PRESETS), default=C.CODEC_DEFAULT, show_default=True,
              help="default: blosc (zstd 1, byte shuffle) + crc32c; none: crc32c only.")
@click.option("--overwrite", is_flag=True, help="Replace a package already at DST (never anything else).")
@click.option("--vhd-size", metavar="SIZE", help="Virtual size of a .vhd DST, e.g. 64G (default: the larger of 4G "
              "and 8x the model; the file only holds what is written).")
@click.option("--placement", type=click.Choice(["pca", "coactivation"]), default="pca", show_default=True,
              help="pca: cells from weight directions; coactivation: neurons active together on --sample share "
              "cells (for top-k routing).")
@click.option("--sample", "sample_file", metavar="TEXTFILE", help="Sample text for --placement coactivation.")
@click.option("--quantize", type=click.Choice(["q8_0", "q4_k"]), help="Store the neuron rows and the core's weight matrices "
              "as GGUF blocks: q8_0 34 bytes per 32 values (gguf's quantizer), q4_k 144 bytes per 256 values "
              "(llama.cpp's reference quantizer; matrices whose rows are not whole blocks of 256 take Q8_0). Norms, "
              "biases and MoE routers stay as they are. The package's values are then the quantized ones.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_user_errors
def convert(src: str, dst: str, graticule: str | None, depth: int | None, codec: str, overwrite: bool,
            vhd_size: str | None, placement: str, sample_file: str | None, quantize: str | None, quiet: bool) -> None:
    """Convert a model (SRC: HF folder, .safetensors, .gguf, .pt/.bin, or a package) into a package at DST
    (a directory, a .zip, a .vhd disk image, or an fsspec URL such as memory:// or s3://)."""
    from spherefmt.convert import save

    size = parse_size(vhd_size) if vhd_size else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample = None
        if sample_file:
            with open(sample_file, encoding="utf-8", errors="replace") as f:
                sample = f.read()
        where = save(src, dst, graticule=graticule, depth=depth, codec=codec, overwrite=overwrite, progress=not quiet,
                     vhd_size=size, placement=placement, sample=sample, quantize=quantize)
    for w in caught:
        if issubclass(w.category, UserWarning) and "Numcodecs" not in str(w.message):
            click.echo(f"sphere: warning: {w.message}", err=True)
    click.echo(f"wrote {where}")


@cli.command()
@click.argument("pkg")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document.")
@_user_errors
def info(pkg: str, as_json: bool) -> None:
    """Architecture, layers, graticule, depth map, experts, sizes and codecs of a package."""
    from spherefmt.format.package import open as open_package

    with open_package(pkg) as p:
        d = package_info(p)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"package       {d['package']}")
    gen = f", generation {d['generation']}" if d["generation"] is not None else " (no manifest)"
    click.echo(f"format        {d['format']} v{d['version']}{gen}, codec {d['codec']}")
    click.echo(f"architecture  {d['architecture']}, {d['tensors']} tensors")
    click.echo(f"size          {_size(d['stored_bytes'])} stored / {_size(d['raw_bytes'])} raw ({d['ratio']:.3f})")
    if "graticule" in d:
        counts = sorted(set(d["neurons_per_layer"]))
        per = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} (grown)"
        click.echo(f"layers        {d['layers']} x {per} neurons "
                   f"(row: {d['neuron_row']['dtype']} x {d['neuron_row']['width']} = "
                   + " + ".join(f"{k}:{v}" for k, v in d["neuron_row"]["fields"].items()) + ")")
        click.echo(f"graticule     {d['graticule'][0]} x {d['graticule'][1]} cells, depth {d['depth']}, "
                   f"{d['experts']} experts")
        for s in d["shells"]:
            click.echo(f"  depth {s['depth']}: layers {s['layers']}, {s['capacity']} neurons per cell")
        if "native_experts" in d:
            ne = d["native_experts"]
            click.echo(f"native MoE    {ne['per_layer']} experts per layer of {ne['neurons']} neurons, one cell each; "
                       f"the model's router picks {ne['top_k']}" + (" (plus a shared expert)" if ne["shared_expert"] else "")
                       + "; --json gives each expert's cell")
        if "quantization" in d:
            qd = d["quantization"]
            click.echo(f"quantized     {qd['type']} blocks: " + ("every neuron row and " if qd["sphere"] else "")
                       + f"{qd['core_tensors']} core matrices (values read as float32)"
                       + (f"; {len(qd['types'])} of them in another type" if qd["types"] else ""))
            if "sphere_rel_rms_change" in qd:
                click.echo(f"  the neuron rows' values moved {100 * qd['sphere_rel_rms_change']:.2f}% (relative RMS) "
                           "when quantized")
        click.echo(f"core          {_size(d['core']['stored_bytes'])} stored / {_size(d['core']['raw_bytes'])} raw")
        click.echo(f"sphere        {_size(d['sphere']['stored_bytes'])} stored / {_size(d['sphere']['raw_bytes'])} raw")
        click.echo(f"placement     {d['placement']['policy']} v{d['placement']['version']}")
        for g in d["placement"].get("growth", []):
            click.echo(f"  grown       +{g['count']} {g['op']}" + (f" in depth {g['depth']}" if g.get("depth") is not None else "")
                       + (f", cell {g['cell']}" if g.get("cell") else ""))
        if "routing" in d:
            r, t = d["routing"], d["routing"]["trained"] or {}
            n_on = sorted(set(r["always_on_cells"]))
            click.echo(f"routing       {'/'.join(map(str, n_on))} always-on cells per layer (the polar cap)"
                       + (f"; sparsified: {t.get('steps')} steps at shares "
                          + ", ".join(f"{100 * x:g}%" for x in t.get("shares", []))
                          + f" (kept step {t.get('best_step')}, chosen at {100 * t.get('active', 0):g}%), "
                          f"{t.get('text_tokens')} tokens of text sha256 {str(t.get('text_sha256'))[:12]}" if t else ""))
        for name, meta in d.get("routers", {}).items():
            if "error" in meta:
                click.echo(f"router        {name}: {meta['error']}")
            else:
                click.echo(f"router        {name} ({meta.get('kind')}, hidden {meta.get('hidden')}"
                           + (f", {meta['trained_tokens']} tokens" if "trained_tokens" in meta else "") + ")")
    if d["warning"]:
        click.echo(f"warning       {d['warning']}")


@cli.command()
@click.argument("pkg")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_user_errors
def verify(pkg: str, as_json: bool, quiet: bool) -> None:
    """Check every object of a package against its manifest (exit 1 when any is missing or
    damaged).  Objects the manifest does not list are leftovers, never read; the next writer
    removes them."""
    from tqdm.auto import tqdm

    from spherefmt.format.package import open as open_package

    with open_package(pkg) as p:
        with tqdm(total=p.stored_bytes(), unit="B", unit_scale=True, desc="verify", disable=True if quiet or as_json else None,
                  leave=False) as bar:
            d = {"package": p.where, **p.verify(progress=bar.update)}
    d["ok"] = not d["missing"] and not d["mismatched"]
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        click.echo(f"{d['package']}: generation {d['generation']}, {d['objects']} objects, {_size(d['bytes'])}: "
                   + ("ok" if d["ok"] else f"{len(d['missing'])} missing, {len(d['mismatched'])} damaged"))
        for what in ("missing", "mismatched"):
            for key in d[what][:20]:
                click.echo(f"  {what:10s} {key}")
        if d["unlisted"]:
            click.echo(f"  {len(d['unlisted'])} unlisted objects (leftovers of interrupted writers; never read)")
    if not d["ok"]:
        sys.exit(1)


@cli.command()
@click.argument("pkg")
@click.argument("lat", type=int)
@click.argument("lon", type=int)
@click.argument("depth", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document.")
@_user_errors
def cell(pkg: str, lat: int, lon: int, depth: int, as_json: bool) -> None:
    """One expert (LAT, LON, DEPTH): its layers, neuron counts, original indices and bytes."""
    from spherefmt.format.package import open as open_package

    with open_package(pkg) as p:
        e = p.expert(lat, lon, depth)
        key = p.shard_key(lat, lon, depth)
        d: dict[str, Any] = {
            "expert": [lat, lon, depth],
            "object": key,
            "stored_bytes": p.object_bytes(key),
            "raw_bytes": int(e.neurons.nbytes),
            "capacity": int(e.index.shape[1]),
            "layers": [
                {"layer": int(layer), "neurons": int(e.counts[i]),
                 "indices": [int(x) for x in e.index[i] if x >= 0],
                 "parents": [int(x) for x, ix in zip(e.parent[i], e.index[i], strict=True) if ix >= 0]}
                for i, layer in enumerate(e.layers)
            ],
        }
    if as_json:
        click.echo(json.dumps(d))
        return
    click.echo(f"expert ({lat}, {lon}, {depth})  object {key}: {_size(d['stored_bytes'])} stored / "
               f"{_size(d['raw_bytes'])} raw, {d['capacity']} slots per layer")
    for lay in d["layers"]:
        idx = np.array(lay["indices"])
        shown = ", ".join(map(str, idx[:12])) + (", ..." if idx.size > 12 else "")
        click.echo(f"  layer {lay['layer']:3d}: {lay['neurons']:4d} neurons  [{shown}]")


@cli.command(name="export")
@click.argument("pkg")
@click.argument("dst")
@click.option("--overwrite", is_flag=True, help="Replace an existing DST.")
@click.option("--format", "fmt", default=None, metavar="NAME",
              help="safetensors, gguf, torch or hf (default: from DST's suffix; no suffix: hf).")
@click.option("--quantize", type=click.Choice(["q8_0", "q4_k"]), help="GGUF: write the matrices as Q8_0 or Q4_K blocks (default for a quantized "
              "package: its own type).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_user_errors
def export_cmd(pkg: str, dst: str, overwrite: bool, fmt: str | None, quantize: str | None, quiet: bool) -> None:
    """Write every tensor back to DST: a .safetensors file, a .gguf (a package converted from GGUF
    as it came; a Llama-family one with llama.cpp's names, Q/K permutation, metadata and
    tokenizer), a torch state dict (.pt/.pth/.bin), or a Hugging Face save_pretrained folder (no suffix)."""
    import os

    from spherefmt.errors import PackageExistsError
    from spherefmt.interop.registry import export

    if os.path.exists(dst) and not overwrite:
        raise PackageExistsError(f"{dst}: exists; pass --overwrite to replace it")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        where = export(pkg, dst, fmt=fmt, progress=not quiet, quantize=quantize)
    for w in caught:
        if issubclass(w.category, UserWarning) and "Numcodecs" not in str(w.message):
            click.echo(f"sphere: warning: {w.message}", err=True)
    click.echo(f"wrote {where}")


@cli.command(name="mount")
@click.argument("pkg")
@click.argument("directory")
@click.option("--rw", is_flag=True, hidden=True)  # refused with the reason (files written there bypass the manifest)
@_user_errors
def mount_cmd(pkg: str, directory: str, rw: bool) -> None:
    """Mount the files inside PKG (a .vhd package) on DIRECTORY, read-only, with libguestfs
    (guestmount).  Change a package with `sphere` commands or spherefmt.open(PKG, "r+"): they
    commit through its manifest; files written under a mount would not (`sphere verify` fails).

    Windows mounts the same file natively: Disk Management > Attach VHD, or in PowerShell
    `Mount-DiskImage -ImagePath C:\\path\\model.vhd`."""
    from spherefmt.containers.vhd.mount import mount

    if rw:
        raise InputError(f"{pkg}: a package mounts read-only: files written under a mount bypass its manifest "
                         "(`sphere verify` then fails); change it with `sphere` commands or "
                         "spherefmt.open(PKG, 'r+'), which commit through the manifest")
    mount(pkg, directory)
    click.echo(f"mounted {pkg} on {directory} (read-only); `sphere unmount {directory}` releases it")


@cli.command(name="unmount")
@click.argument("directory")
@_user_errors
def unmount_cmd(directory: str) -> None:
    """Unmount a DIRECTORY mounted by `sphere mount`."""
    from spherefmt.containers.vhd.mount import unmount

    unmount(directory)


_RUN_OPTIONS = [
    click.option("--backend", "-b", metavar="NAME", help="numpy, torch, torch:cpu, torch:cuda[:N], vulkan "
                 "(default: $SPHEREFMT_BACKEND, else the first that starts; see `sphere backends`)."),
    click.option("--budget", metavar="SIZE|N%", help="Device memory for weights, KV cache and scratch, e.g. 512MiB "
                 "or 25% (of the weights as stored: a bfloat16 model's 25% is half the bytes of a float32 one's). "
                 "Default: unlimited."),
    click.option("--top-k", type=int, metavar="K", help="Cells per token and layer (default: dense, every cell)."),
    click.option("--active", metavar="SHARE", help="Or the share of each layer's cells per token, e.g. 25%."),
    click.option("--router", metavar="NAME", help="For top-k: a stored router (default: learned if stored, else "
                 "centroid), centroid, or random."),
    click.option("--prefetch/--no-prefetch", default=None, help="Load the next layer's likely blocks in the "
                 "background (default: on for GPUs and CPUs with 4+ cores)."),
    click.option("--weights", type=click.Choice(["auto", "stored", "float32"]), default="auto", show_default=True,
                 help="How the device holds float16/bfloat16/Q8_0/Q4_K weights: as stored (fewest bytes), widened to "
                 "float32 at load, or auto (as stored on GPUs; on CPUs widened unless only the stored blocks fit)."),
]


def _run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(_RUN_OPTIONS):
        fn = opt(fn)
    return fn


def _session(pkg: str, backend: str | None, budget: str | None, top_k: int | None, active: str | None,
             router: str | None, prefetch: bool | None, weights: str = "auto") -> Any:
    import warnings

    from spherefmt.runtime import Session

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # said once below, as a line of its own
        s = Session(pkg, backend=backend, budget=budget, top_k=top_k, active=active, prefetch=prefetch,
                    router=router, weights=weights)
    if s.share_warning:
        click.echo(f"warning: {s.share_warning}", err=True)
    return s


def _load_ids(path: str) -> np.ndarray:
    """Token ids from a ``.npy`` file (no pickles), 1-D integers."""
    from spherefmt.errors import FormatError, InputError

    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as e:
        raise FormatError(f"{path}: not a .npy array of token ids ({str(e)[:100]})") from None
    if not isinstance(ids, np.ndarray) or ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{path}: token ids must be a 1-D integer array, got {getattr(ids, 'dtype', '?')}"
                         f"{getattr(ids, 'shape', '')}")
    return ids


def _print_stats(stats: dict[str, Any]) -> None:
    def fmt(k: str, v: Any) -> str:
        if v is None:
            return "-"
        if k.endswith("_bytes") or k.startswith("bytes_"):
            return _size(v)
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    for k, v in stats.items():
        click.echo(f"  {k:<22} {fmt(k, v)}", err=True)


@cli.command()
@click.argument("pkg")
@click.option("--prompt", "-p", help="Prompt text (tokenized with the package's tokenizer, else UTF-8 bytes).")
@click.option("--ids", "ids_file", metavar="FILE.npy", help="Prompt as token ids instead of text.")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=0), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 picks the most likely token (greedy).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@_run_options
@click.option("--stats", "show_stats", is_flag=True, help="Print runtime figures (to stderr) at the end.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (ids, text, stats) at the end.")
@_user_errors
def run(pkg: str, prompt: str | None, ids_file: str | None, max_new_tokens: int, temperature: float, seed: int,
        backend: str | None, budget: str | None, top_k: int | None, active: str | None,
        router: str | None, prefetch: bool | None, weights: str, show_stats: bool, as_json: bool) -> None:
    """Generate text from PKG, streaming tokens as they come, under a device memory budget."""
    from spherefmt.errors import InputError

    if (prompt is None) == (ids_file is None):
        raise InputError("give --prompt TEXT or --ids FILE.npy")
    with _session(pkg, backend, budget, top_k, active, router, prefetch, weights) as s:
        ids = _load_ids(ids_file) if ids_file else s.encode(prompt)
        out: list[int] = []
        shown = ""
        text_ok = prompt is not None
        for tok in s.stream(ids, max_new_tokens, temperature=temperature, seed=seed):
            out.append(tok)
            if as_json:
                continue
            if not text_ok:
                click.echo(f"{tok} ", nl=False)
                continue
            text = s.decode(out)
            if not text.endswith("\ufffd"):  # hold back half a multi-byte character
                click.echo(text[len(shown):], nl=False)
                shown = text
        stats = s.stats()
        if as_json:
            doc = {"ids": out, "stats": stats}
            if text_ok:
                doc["text"] = s.decode(out)
            click.echo(json.dumps(doc, indent=2))
            return
        if text_ok and s.decode(out) != shown:
            click.echo(s.decode(out)[len(shown):], nl=False)
        click.echo()
        if show_stats:
            _print_stats(stats)


@cli.command(name="eval")
@click.argument("pkg")
@click.option("--text", "text_file", metavar="FILE", help="UTF-8 text to score.")
@click.option("--ids", "ids_file", metavar="FILE.npy", help="Token ids to score instead of text.")
@click.option("--max-tokens", type=click.IntRange(min=2), help="Score only the first N tokens.")
@_run_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_user_errors
def eval_cmd(pkg: str, text_file: str | None, ids_file: str | None, max_tokens: int | None, backend: str | None,
             budget: str | None, top_k: int | None, active: str | None, router: str | None, prefetch: bool | None,
             weights: str, as_json: bool, quiet: bool) -> None:
    """Mean negative log-likelihood and perplexity of PKG on a text (windows of the model's context)."""
    import math

    from spherefmt.errors import InputError

    if (text_file is None) == (ids_file is None):
        raise InputError("give --text FILE or --ids FILE.npy")
    with _session(pkg, backend, budget, top_k, active, router, prefetch, weights) as s:
        if text_file:
            with open(text_file, encoding="utf-8", errors="replace") as f:
                ids = np.asarray(s.encode(f.read()), dtype=np.int64)
        else:
            ids = _load_ids(cast(str, ids_file))  # not None: exactly one of --text, --ids (checked above)
        if max_tokens:
            ids = ids[:max_tokens]
        total, n = s.nll(ids, progress=not quiet and not as_json)
        st = s.stats()
    doc = {"tokens": n, "nll": total / n, "ppl": math.exp(total / n), "backend": st["backend"], "mode": st["mode"],
           "budget_bytes": st["budget_bytes"], "peak_device_bytes": st["peak_device_bytes"],
           "active_cell_fraction": st["active_cell_fraction"], "active_share_requested": st["active_share_requested"],
           "active_share_used": st["active_share_used"], "tokens_per_s": st["prefill_tokens_per_s"]}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"{n} tokens  nll {doc['nll']:.4f}  ppl {doc['ppl']:.3f}  ({st['mode']}, {st['backend']})")


@cli.command(name="route-train")
@click.argument("pkg")
@click.option("--text", "text_file", metavar="FILE", help="UTF-8 sample text (tokenized with the package's tokenizer).")
@click.option("--ids", "ids_file", metavar="FILE.npy", help="Sample token ids instead of text.")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True, help="Optimiser steps per layer.")
@click.option("--hidden", type=click.IntRange(min=1, max=4096), default=128, show_default=True,
              help="Hidden width of each layer's router.")
@click.option("--name", default="learned", show_default=True, help="Stored as router/NAME.")
@click.option("--max-tokens", type=click.IntRange(min=16), default=20000, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_user_errors
def route_train(pkg: str, text_file: str | None, ids_file: str | None, steps: int, hidden: int, name: str,
                max_tokens: int, quiet: bool) -> None:
    """Train a router for PKG by distillation from its own FFN on sample text and store it in the
    package, in place (also inside a .vhd): only router/NAME objects are written."""
    from spherefmt.errors import InputError
    from spherefmt.format.package import open as open_package
    from spherefmt.format.routers import write_router
    from spherefmt.runtime.tokenizer import load_tokenizer
    from spherefmt.training.routers import train_router

    if (text_file is None) == (ids_file is None):
        raise InputError("give --text FILE or --ids FILE.npy")
    with open_package(pkg, "r+") as p:
        if text_file:
            with open(text_file, encoding="utf-8", errors="replace") as f:
                ids = np.asarray(load_tokenizer(p).encode(f.read()), dtype=np.int64)
        else:
            ids = _load_ids(cast(str, ids_file))  # not None: exactly one of --text, --ids (checked above)
        ids = ids[:max_tokens]
        if len(ids) < 16:
            raise InputError(f"need at least 16 sample tokens, got {len(ids)}")
        router = train_router(p, ids, steps=steps, hidden=hidden, progress=not quiet)
        write_router(p, name, router)
    click.echo(f"wrote router/{name} ({router.kind}, {len(router.layers)} layers, {len(ids)} sample tokens) to {pkg}")


@cli.command(name="map")
@click.argument("pkg")
@click.option("--output", "-o", default="map.png", show_default=True, help="PNG to write.")
@click.option("--layer", type=int, help="One layer instead of one panel per depth shell.")
@click.option("--usage", "usage_file", metavar="TEXTFILE",
              help="Colour by how often the router picked each cell on this text (else: neurons per cell).")
@click.option("--active", default="25%", show_default=True, help="Share of cells the router picks, with --usage.")
@click.option("--router", metavar="NAME", help="Router for --usage (default: learned if stored, else centroid).")
@click.option("--trees", is_flag=True, help="Draw the lightning trees in 3D instead.")
@_user_errors
def map_cmd(pkg: str, output: str, layer: int | None, usage_file: str | None, active: str, router: str | None,
            trees: bool) -> None:
    """Draw PKG's graticule as world maps (Mollweide, one panel per depth shell) or its lightning trees."""
    from spherefmt.format.package import open as open_package
    from spherefmt.viz import draw_map, draw_trees

    with open_package(pkg) as p:
        if trees:
            out = draw_trees(p, output)
        elif usage_file:
            from spherefmt.runtime import Session

            with Session(p, backend="numpy", active=active, router=router, prefetch=False) as s:
                with open(usage_file, encoding="utf-8", errors="replace") as f:
                    ids = np.asarray(s.encode(f.read()), dtype=np.int64)[:4096]
                s.nll(ids)
                out = draw_map(p, output, layer, usage=s.usage)
        else:
            out = draw_map(p, output, layer)
    click.echo(f"wrote {out}")


def _expert_address(text: str) -> tuple[int, int, int]:
    from spherefmt.errors import InputError

    try:
        lat, lon, depth = (int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"expert {text!r}: expected LAT,LON,DEPTH") from None
    return lat, lon, depth


@cli.command()
@click.argument("pkg")
@click.option("--text", "text_file", required=True, metavar="FILE", help="UTF-8 training text.")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--experts", "experts", multiple=True, metavar="LAT,LON,DEPTH",
              help="Train only these experts (repeatable); everything else stays frozen.")
@click.option("--all", "train_all", is_flag=True, help="Train every parameter.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seq", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--plot", metavar="PNG", help="Write the loss curve here (default: PKG-loss.png beside PKG).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_user_errors
def train(pkg: str, text_file: str, steps: int, experts: tuple[str, ...], train_all: bool, lr: float, batch: int,
          seq: int, plot: str | None, seed: int, quiet: bool) -> None:
    """Fine-tune PKG (all of it, or selected experts) on a text with Adam, then write back in place
    only the experts and tensors that changed."""
    import torch
    from tqdm.auto import tqdm

    from spherefmt.errors import InputError
    from spherefmt.runtime.tokenizer import load_tokenizer
    from spherefmt.training.modules import load

    if bool(experts) == train_all:
        raise InputError("give --experts LAT,LON,DEPTH (one or more) or --all")
    chosen = "all" if train_all else [_expert_address(e) for e in experts]
    m = load(pkg, trainable=chosen)
    try:
        vocab = m.model.get_input_embeddings().weight.shape[0]
        with open(text_file, encoding="utf-8", errors="replace") as f:
            ids = np.asarray(load_tokenizer(m.pkg, vocab).encode(f.read()), dtype=np.int64)
        ctx = int((m.pkg.config or {}).get("n_positions") or (m.pkg.config or {}).get("max_position_embeddings") or 1024)
        seq = min(seq, ctx)
        if len(ids) <= seq + 1:
            raise InputError(f"{text_file}: {len(ids)} tokens; need more than {seq + 1}")
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        # Adam without weight decay: decay would move the frozen neurons too
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        losses = []
        m.model.train()
        for _ in tqdm(range(steps), desc="train", disable=True if quiet else None):
            starts = rng.integers(0, len(ids) - seq - 1, batch)
            x = torch.from_numpy(np.stack([ids[s : s + seq] for s in starts]))
            loss = m.model(x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        written = m.save_changes()
    finally:
        m.pkg.close()
    out = plot or f"{str(pkg).rstrip('/')}-loss.png"
    from spherefmt.viz import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{len(losses)} steps, " + ("all parameters" if train_all else f"{len(experts)} expert(s)"), fontsize=9)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    click.echo(f"loss {np.mean(losses[:5]):.4f} -> {np.mean(losses[-5:]):.4f}; wrote {len(written['experts'])} "
               f"expert(s) and {len(written['tensors'])} tensor(s), {written['bytes']} bytes, to {pkg}; curve {out}")


def _share(text: str, what: str, zero: bool = False) -> float:
    """A share given as a percentage (``25%`` or ``25``) or a fraction (``0.25``); ``zero``:
    0 is allowed too."""
    from spherefmt.errors import InputError

    t = text.strip()
    try:
        v = float(t.rstrip("%"))
    except ValueError:
        raise InputError(f"{what} {text!r}: expected a percentage such as 25%") from None
    share = v / 100 if t.endswith("%") or v > 1 else v
    if not (0 <= share if zero else 0 < share) or share > 1:
        raise InputError(f"{what} {text!r}: expected a share in {'[0%' if zero else '(0%'}, 100%]")
    return share


@cli.command()
@click.argument("pkg")
@click.option("--text", "text_file", required=True, metavar="FILE",
              help="UTF-8 text of the model's domain (placement, fine-tuning and the router learn from it).")
@click.option("--active", default="25%", show_default=True,
              help="The share of cells the model is made for (it chooses the checkpoint kept).")
@click.option("--shares", default="12.5,25,50,100", show_default=True, metavar="LIST",
              help="Shares of cells (percent) trained in turn, so that one package serves each of them.")
@click.option("--cells", type=click.IntRange(min=2), default=128, show_default=True,
              help="Cells per layer of the new graticule (P x M closest to M = 2P).")
@click.option("--steps", type=click.IntRange(min=1), default=600, show_default=True, help="Fine-tuning steps.")
@click.option("--always-on", default="10%", show_default=True,
              help="Share of cells (the polar cap) every token computes, holding the most-used neurons.")
@click.option("--distill", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Weight of the KL divergence from the original dense model (the rest: the language-model loss).")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seq", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--router-steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Optimiser steps per layer of the router distilled afterwards.")
@click.option("--router-tokens", type=click.IntRange(min=16), default=20000, show_default=True,
              help="Tokens of the text the router learns from.")
@click.option("--plot", metavar="PNG", help="Write the loss curve here (default: PKG-sparsify.png beside PKG).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print what was done as one JSON document.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_user_errors
def sparsify(pkg: str, text_file: str, active: str, shares: str, cells: int, steps: int, always_on: str,
             distill: float, lr: float, batch: int, seq: int, router_steps: int, router_tokens: int,
             plot: str | None, seed: int, as_json: bool, quiet: bool) -> None:
    """Make PKG sparse on its sphere, in place (directory, .zip, .vhd): place its neurons for top-k
    routing (the most-used ones in always-on polar cells), fine-tune it with top-k cell routing
    in the forward pass at a mix of shares, and distil a router (router/learned).  Only the
    objects that changed are written back.  Ctrl-C stops the fine-tuning early and keeps the best
    checkpoint so far."""
    from spherefmt.format.package import open as open_package
    from spherefmt.runtime.tokenizer import load_tokenizer
    from spherefmt.training.sparsify import check
    from spherefmt.training.sparsify import sparsify as run_sparsify

    share_list = [_share(x, "--shares") for x in shares.split(",") if x.strip()]
    with open_package(pkg) as p:
        check(p)
        with open(text_file, encoding="utf-8", errors="replace") as f:
            ids = np.asarray(load_tokenizer(p).encode(f.read()), dtype=np.int64)
    r = run_sparsify(pkg, ids, active=_share(active, "--active"), shares=share_list, cells=cells, steps=steps,
                     always_on=_share(always_on, "--always-on", zero=True),
                     distill=distill, batch=batch, seq=seq, lr=lr, router_steps=router_steps,
                     router_tokens=router_tokens, seed=seed, progress=not quiet and not as_json)
    out = plot or f"{str(pkg).rstrip('/')}-sparsify.png"
    from spherefmt.viz import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(r["losses"], linewidth=0.6, alpha=0.6, label="training loss (language model + KL to the dense model; shares in turn)")
    if r["val"]:
        v = np.asarray(r["val"])
        ax.plot(v[:, 0], v[:, 1], marker="o", markersize=3, label=f"held back, {_share(active, '--active'):.0%} active")
        ax.plot(v[:, 0], v[:, 2], marker="s", markersize=3, label="held back, dense")
    ax.axvline(r["best_step"], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nll per token)")
    ax.set_title(f"sparsify: {r['graticule'][0]}x{r['graticule'][1]} cells, {r['always_on']} always on, "
                 f"kept step {r['best_step']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    doc = {k: r[k] for k in ("graticule", "always_on", "best_step", "stopped_early", "seconds", "unchanged")}
    doc.update({"val": r["val"], "written": len(r["written"]), "removed": len(r["removed"]), "plot": out,
                "tensors_trained": len(r["tensors_trained"])})
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    kept = next(v for v in r["val"] if v[0] == r["best_step"])
    held = f"{r['val'][0][1]:.4f} -> {kept[1]:.4f} at {_share(active, '--active'):.0%}, {kept[2]:.4f} dense"
    click.echo(f"sparsified {pkg}: {r['graticule'][0]}x{r['graticule'][1]} graticule, {r['always_on']} always-on cells, "
               f"held-back loss {held} (kept step {r['best_step']}{', stopped early' if r['stopped_early'] else ''}); "
               f"wrote {len(r['written'])} objects, removed {len(r['removed'])}, kept {r['unchanged']}; "
               f"{r['seconds']:.0f} s; curve {out}")


@cli.command()
@click.argument("pkg")
@click.option("--neurons", type=int, default=0, metavar="N",
              help="Add N neurons to every layer (of --depth D only, when given).")
@click.option("--cell", metavar="LAT,LON", help="Put the new neurons in this cell (needs --depth).")
@click.option("--depth", type=int, default=None, help="Only the layers of this depth shell.")
@click.option("--layers", type=int, default=0, metavar="N",
              help="Append N identity transformer blocks (a new depth shell while the sphere has fewer than 10).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the new neurons' input weights.")
@click.option("--json", "as_json", is_flag=True, help="Print what changed as JSON.")
@_user_errors
def grow(pkg: str, neurons: int, cell: str | None, depth: int | None, layers: int, seed: int, as_json: bool) -> None:
    """Grow PKG in place without changing what it computes: new neurons start with zero output
    weights, new layers with zero output projections.  Train them afterwards (sphere train).
    Inside a .vhd the image grows; objects already stored are not rewritten, except experts
    whose free slots receive neurons."""
    from spherefmt.errors import InputError
    from spherefmt.training.grow import grow_layers, grow_neurons

    if (neurons > 0) == (layers > 0) or neurons < 0 or layers < 0:
        raise InputError("give --neurons N or --layers N (a positive number, one of the two)")
    if cell is not None:
        try:
            lat, lon = (int(v) for v in cell.split(","))
        except ValueError:
            raise InputError(f"cell {cell!r}: expected LAT,LON") from None
    out: dict[str, Any]
    if neurons:
        out = grow_neurons(pkg, neurons, cell=(lat, lon) if cell is not None else None, depth=depth, seed=seed)
    else:
        if cell is not None or depth is not None:
            raise InputError("--cell and --depth go with --neurons; new layers take the cells of the last layer")
        out = grow_layers(pkg, layers)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    elif neurons:
        for s in out["shells"]:
            click.echo(f"depth {s['depth']}: +{neurons} neurons per layer in {len(s['experts'])} expert(s); "
                       f"capacity {s['capacity'][0]} -> {s['capacity'][1]}")
    else:
        click.echo(f"added layers {out['layers']} in depth shell {out['depth']}"
                   + (" (new shell)" if out["new_shell"] else " (the surface shell)"))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document.")
@_user_errors
def backends(as_json: bool) -> None:
    """Every compute backend, whether it starts here, and why not; the one used when none is
    named (a GPU first, never a CPU Vulkan emulation, then numpy) is marked default."""
    from spherefmt.backends import get_backend, probe

    rows = probe()
    chosen = get_backend().name
    for r in rows:
        r["default"] = r["name"] == chosen or (r["name"] == "torch:cuda" and chosen.startswith("torch:cuda"))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        if r["available"]:
            extra = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("name", "available", "backend"))
            extra = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("name", "available", "backend", "default"))
            click.echo(f"{r['name']:<12} yes  {extra}" + ("  (default)" if r["default"] else ""))
        else:
            click.echo(f"{r['name']:<12} no   {r['reason']}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sphere`` command."""
    # pyfatfs warns in two lines about what it meets in a damaged volume; the command reports
    # what that breaks in its one line (the container keeps the notes: VHDFileSystem.fat_notes)
    warnings.filterwarnings("ignore", category=UserWarning, module="pyfatfs")
    cli.main(args=argv, prog_name="sphere")


if __name__ == "__main__":
    main()
