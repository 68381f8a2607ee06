"""Mount package VHDs for people: libguestfs (``guestmount``) on Linux; Windows mounts the
same file natively (Disk Management, or ``Mount-DiskImage -ImagePath X.vhd`` in PowerShell).

libguestfs starts a small appliance VM; where KVM is not usable it must run under TCG
(``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``), which :func:`guest_env` detects.  It is slow to
start (about 12-20 s without KVM) and is only for people and checks, never the read path.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from spherefmt.errors import BackendUnavailableError, SpherefmtError

__all__ = ["guest_env", "kvm_usable", "mount", "unmount", "open_guestfs", "INSTALL_HINT"]

INSTALL_HINT = "install libguestfs: sudo apt-get install libguestfs-tools python3-guestfs linux-image-amd64"
PARTITION = "/dev/sda1"


def kvm_usable() -> bool:
    """Whether a VM can really be created (``/dev/kvm`` may open yet refuse KVM_CREATE_VM)."""
    import fcntl

    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    try:
        vm = fcntl.ioctl(fd, 0xAE01, 0)  # KVM_CREATE_VM
        os.close(vm)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def kvm_works() -> bool:
    """Whether the libguestfs appliance really boots under KVM here.  ``/dev/kvm`` can create a
    VM and the appliance still hang at boot (nested virtualisation, seen on these machines), so
    an empty appliance is started once, in a child bounded by a timeout."""
    if not kvm_usable() or shutil.which("guestfish") is None:
        return False
    try:  # the answer holds until the machine reboots: kept per boot
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot = ""
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "spherefmt",
                         f"kvm-{boot}")
    try:
        return open(cache).read().strip() == "yes"
    except OSError:
        pass
    env = {k: v for k, v in os.environ.items() if k != "LIBGUESTFS_BACKEND_SETTINGS"}
    env.setdefault("LIBGUESTFS_BACKEND", "direct")
    try:
        r = subprocess.run(["guestfish", "--ro", "-a", "/dev/null", "run"], env=env, capture_output=True,
                           timeout=KVM_PROBE_SECONDS, check=False)
        works = r.returncode == 0
    except subprocess.TimeoutExpired:
        works = False
    if boot:
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(cache, "w") as f:
                f.write("yes\n" if works else "no\n")
        except OSError:
            pass
    return works


#: an appliance boots in a few seconds under KVM; one that takes longer is taken for a hang
KVM_PROBE_SECONDS = 40


def guest_env(tcg: bool = False) -> dict[str, str]:
    """Environment for libguestfs: the direct backend, and TCG when asked or when KVM does not
    work (the user's own ``LIBGUESTFS_BACKEND_SETTINGS`` wins)."""
    env = dict(os.environ)
    env.setdefault("LIBGUESTFS_BACKEND", "direct")
    if "LIBGUESTFS_BACKEND_SETTINGS" not in os.environ and (tcg or not kvm_works()):
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    return env


def _attempts() -> list[bool]:
    """TCG flags to try: KVM first where it works, then TCG."""
    return [True] if os.environ.get("LIBGUESTFS_BACKEND_SETTINGS") == "force_tcg" or not kvm_works() else [False, True]


def mount(pkg: str, directory: str) -> None:
    """Mount the filesystem inside ``pkg`` (a package .vhd) on ``directory`` with guestmount,
    read-only: a package changes only through its manifest (files written under a read-write
    mount would be unlisted or damaged objects)."""
    if shutil.which("guestmount") is None:
        raise BackendUnavailableError(f"guestmount not found: {INSTALL_HINT}")
    if not os.path.isfile(pkg):
        raise SpherefmtError(f"{pkg}: no such file")
    if not os.path.isdir(directory):
        raise SpherefmtError(f"{directory}: not a directory")
    cmd = ["guestmount", "--format=vpc", "-a", pkg, "-m", PARTITION, "--ro", directory]
    for tcg in _attempts():
        r = subprocess.run(cmd, env=guest_env(tcg), capture_output=True, text=True)
        if r.returncode == 0:
            break
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["guestmount failed"])[-1]
        raise SpherefmtError(f"{pkg}: cannot mount: {last}")


def unmount(directory: str) -> None:
    """Unmount a directory mounted by :func:`mount` (waits for the image to be released)."""
    if shutil.which("guestunmount") is None:
        raise BackendUnavailableError(f"guestunmount not found: {INSTALL_HINT}")
    r = subprocess.run(["guestunmount", directory], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["guestunmount failed"])[-1]
        raise SpherefmtError(f"{directory}: cannot unmount: {last}")


def open_guestfs(pkg: str, readonly: bool = True, extra: Sequence[str] = ()) -> Any:
    """A launched ``guestfs.GuestFS`` handle with the package's filesystem mounted at ``/``
    (``extra``: more ``.vhd`` files attached writable as the next drives, ``/dev/sdb`` on).

    The Debian bindings are built for the system Python; their folder is added to ``sys.path``
    when the running interpreter cannot import them directly.
    """
    try:
        import guestfs
    except ImportError:
        if "/usr/lib/python3/dist-packages" not in sys.path:
            sys.path.append("/usr/lib/python3/dist-packages")
        try:
            import guestfs
        except ImportError:
            raise BackendUnavailableError(f"the guestfs Python module is missing: {INSTALL_HINT}") from None
    for tcg in _attempts():
        for k, v in guest_env(tcg).items():
            if k.startswith("LIBGUESTFS"):
                os.environ[k] = v
        g = guestfs.GuestFS(python_return_dict=True)
        g.add_drive_opts(pkg, format="vpc", readonly=1 if readonly else 0)
        for other in extra:
            g.add_drive_opts(other, format="vpc", readonly=0)
        try:
            g.launch()
            break
        except RuntimeError:
            g.close()
            if tcg:
                raise
    (g.mount_ro if readonly else g.mount)(PARTITION, "/")
    return g
