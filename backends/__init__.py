"""Compute backends of the spherefmt runtime, installed as ``spherefmt.backends``.

The backend interface (upload, free, copy back, synchronize, memory figures and the transformer
ops) and its numpy, torch and Vulkan implementations arrive with the runtime issue; this folder
is part of the fixed repository layout and installs under the ``spherefmt`` namespace so that no
generic top-level ``backends`` package lands in site-packages.
"""
