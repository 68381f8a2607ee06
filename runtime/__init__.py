"""Streaming inference runtime of spherefmt, installed as ``spherefmt.runtime``.

The GPT-2 and Llama forward passes over packages, the expert cache under a memory budget and the
prefetcher arrive with the runtime issue; this folder is part of the fixed repository layout and
installs under the ``spherefmt`` namespace (never as a top-level ``runtime`` package).
"""
