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
from typing import Any

import click
import numpy as np

from . import constants as C
from .errors import SpherefmtError
from .units import format_size as _size
from .units import parse_size

__all__ = ["main", "cli", "package_info"]


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (SpherefmtError, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            click.echo(f"sphere: error: {msg}", err=True)
            sys.exit(2)

    return wrapper


def package_info(pkg: Any) -> dict[str, Any]:
    """The summary ``sphere info`` prints (also its ``--json`` document)."""
    h = pkg.metadata
    raw = sum(pkg.tensor_info(n).nbytes for n in pkg.keys())
    core_raw = sum(pkg.tensor_info(n).nbytes for n in pkg.keys() if pkg._tensors[n]["where"] == "core")
    out: dict[str, Any] = {
        "package": pkg.where,
        "format": h["format"],
        "version": h["version"],
        "architecture": h["architecture"],
        "tensors": len(h["tensors"]),
        "codec": h["codec"],
        "raw_bytes": raw,
        "stored_bytes": pkg.stored_bytes(),
        "core": {"tensors": sum(t["where"] == "core" for t in h["tensors"]), "raw_bytes": core_raw,
                 "stored_bytes": pkg.stored_bytes(C.CORE_GROUP)},
        "files": h.get("files", []),
        "warning": h.get("warning"),
    }
    out["ratio"] = out["stored_bytes"] / raw if raw else 1.0
    if pkg.graticule:
        p, m = pkg.graticule
        nl = h["neuron_layout"]
        out.update({
            "layers": len(h["layers"]),
            "neurons_per_layer": [lay["neurons"] for lay in h["layers"]],
            "graticule": [p, m],
            "depth": h["depth"],
            "layer_depth": h["layer_depth"],
            "shells": [{"depth": s["depth"], "layers": s["layers"], "capacity": s["capacity"]} for s in h["shells"]],
            "experts": p * m * h["depth"],
            "neuron_row": {"dtype": nl["dtype"], "width": nl["row_width"],
                           "fields": {f["name"]: f["width"] for f in nl["fields"]}},
            "placement": h["placement"],
            "sphere": {"raw_bytes": raw - core_raw, "stored_bytes": pkg.stored_bytes(C.SPHERE_GROUP)},
        })
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spherefmt")
def cli() -> None:
    """spherefmt: transformer FFN neurons on a sphere, in a chunked, compressed Zarr package.

    \b
    Quick start:
      sphere convert gpt2-folder/ model.sphere      # HF folder, .safetensors, .pt/.bin
      sphere info model.sphere
      sphere cell model.sphere 1 2 0                # expert (lat=1, lon=2, depth=0)
      sphere export model.sphere back.safetensors   # bit for bit
    """


@cli.command()
@click.argument("src")
@click.argument("dst")
@click.option("--graticule", metavar="PxM|earth", help="Parallels x meridians, e.g. 18x36, or 'earth' (180x360). "
              "Default adapts to the model so one cell of one layer is >= 256 KiB.")
@click.option("--depth", type=int, help=f"Depth shells 1..{C.MAX_DEPTH}. Default min(10, layers).")
@click.option("--codec", type=click.Choice(C.CODEC_PRESETS), default=C.CODEC_DEFAULT, show_default=True,
              help="default: shuffle + zstd(1) + crc32c; none: crc32c only.")
@click.option("--overwrite", is_flag=True, help="Replace a package already at DST (never anything else).")
@click.option("--vhd-size", metavar="SIZE", help="Virtual size of a .vhd DST, e.g. 64G (default: the larger of 4G "
              "and 8x the model; the file only holds what is written).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_user_errors
def convert(src: str, dst: str, graticule: str | None, depth: int | None, codec: str, overwrite: bool,
            vhd_size: str | None, quiet: bool) -> None:
    """Convert a model (SRC: HF folder, .safetensors, .pt/.bin, or a package) into a package at DST
    (a directory, a .zip, a .vhd disk image, or an fsspec URL such as memory:// or s3://)."""
    from .package import save

    size = parse_size(vhd_size) if vhd_size else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        where = save(src, dst, graticule=graticule, depth=depth, codec=codec, overwrite=overwrite, progress=not quiet,
                     vhd_size=size)
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
    from .package import open as open_package

    with open_package(pkg) as p:
        d = package_info(p)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"package       {d['package']}")
    click.echo(f"format        {d['format']} v{d['version']}, codec {d['codec']}")
    click.echo(f"architecture  {d['architecture']}, {d['tensors']} tensors")
    click.echo(f"size          {_size(d['stored_bytes'])} stored / {_size(d['raw_bytes'])} raw ({d['ratio']:.3f})")
    if "graticule" in d:
        click.echo(f"layers        {d['layers']} x {d['neurons_per_layer'][0]} neurons "
                   f"(row: {d['neuron_row']['dtype']} x {d['neuron_row']['width']} = "
                   + " + ".join(f"{k}:{v}" for k, v in d["neuron_row"]["fields"].items()) + ")")
        click.echo(f"graticule     {d['graticule'][0]} x {d['graticule'][1]} cells, depth {d['depth']}, "
                   f"{d['experts']} experts")
        for s in d["shells"]:
            click.echo(f"  depth {s['depth']}: layers {s['layers']}, {s['capacity']} neurons per cell")
        click.echo(f"core          {_size(d['core']['stored_bytes'])} stored / {_size(d['core']['raw_bytes'])} raw")
        click.echo(f"sphere        {_size(d['sphere']['stored_bytes'])} stored / {_size(d['sphere']['raw_bytes'])} raw")
        click.echo(f"placement     {d['placement']['policy']} v{d['placement']['version']}")
    if d["warning"]:
        click.echo(f"warning       {d['warning']}")


@cli.command()
@click.argument("pkg")
@click.argument("lat", type=int)
@click.argument("lon", type=int)
@click.argument("depth", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document.")
@_user_errors
def cell(pkg: str, lat: int, lon: int, depth: int, as_json: bool) -> None:
    """One expert (LAT, LON, DEPTH): its layers, neuron counts, original indices and bytes."""
    from .package import open as open_package

    with open_package(pkg) as p:
        e = p.expert(lat, lon, depth)
        key = p.shard_key(lat, lon, depth)
        d = {
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
@click.option("--overwrite", is_flag=True, help="Replace an existing DST file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_user_errors
def export_cmd(pkg: str, dst: str, overwrite: bool, quiet: bool) -> None:
    """Write every tensor back to DST (.safetensors, or .pt/.pth/.bin for a torch state dict)."""
    import os

    from .errors import PackageExistsError
    from .export import export

    if os.path.exists(dst) and not overwrite:
        raise PackageExistsError(f"{dst}: exists; pass --overwrite to replace it")
    click.echo(f"wrote {export(pkg, dst, progress=not quiet)}")


@cli.command(name="mount")
@click.argument("pkg")
@click.argument("directory")
@click.option("--rw", is_flag=True, help="Mount read-write (default read-only).")
@_user_errors
def mount_cmd(pkg: str, directory: str, rw: bool) -> None:
    """Mount the files inside PKG (a .vhd package) on DIRECTORY with libguestfs (guestmount).

    Windows mounts the same file natively: Disk Management > Attach VHD, or in PowerShell
    `Mount-DiskImage -ImagePath C:\\path\\model.vhd`."""
    from .mount import mount

    mount(pkg, directory, rw=rw)
    click.echo(f"mounted {pkg} on {directory} ({'read-write' if rw else 'read-only'}); `sphere unmount {directory}` "
               "releases it")


@cli.command(name="unmount")
@click.argument("directory")
@_user_errors
def unmount_cmd(directory: str) -> None:
    """Unmount a DIRECTORY mounted by `sphere mount`."""
    from .mount import unmount

    unmount(directory)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sphere`` command."""
    cli.main(args=argv, prog_name="sphere")


if __name__ == "__main__":
    main()
