#!/usr/bin/env bash
# Debian packages the tests check our files against: qemu-img (VHD reference), fsck.vfat, mtools and sgdisk
# (FAT32 on MBR and GPT disks), node + npm (zarrita.js), libguestfs (a real kernel mounts our images), and the Vulkan loader + lavapipe. Installed when missing and
# running as root (CI); otherwise named. A package is missing when its witness file is absent.
set -u
need=""
witness() { [ -e "$1" ] || command -v "$1" >/dev/null 2>&1 || need="$need $2"; }
witness qemu-img qemu-utils
witness /usr/sbin/fsck.vfat dosfstools
witness mcopy mtools
witness /usr/sbin/sgdisk gdisk  # GPT-partitioned test images
witness guestmount libguestfs-tools
witness node nodejs  # zarrita.js, a JavaScript Zarr reader, reads packages in the portability tests
witness npm npm
witness /usr/lib/python3/dist-packages/guestfs.py python3-guestfs
ls /boot/vmlinuz-* >/dev/null 2>&1 || need="$need linux-image-amd64"
# Vulkan: the loader and Mesa's drivers (lavapipe runs the Vulkan backend's shaders on the CPU)
witness /usr/share/vulkan/icd.d/lvp_icd.x86_64.json mesa-vulkan-drivers
ls /usr/lib/x86_64-linux-gnu/libvulkan.so.1 >/dev/null 2>&1 || need="$need libvulkan1"
[ -z "$need" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing:$need"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
else
  echo "please install:$need (sudo apt-get install$need); tests that need them are skipped"
fi
exit 0
