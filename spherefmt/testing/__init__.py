"""Helpers shipped for tests and demos: small models with real layouts, made locally."""

from spherefmt.testing.models import gpt2_config, llama_config, make_gpt2, make_llama, save_hf_folder

__all__ = ["gpt2_config", "llama_config", "make_gpt2", "make_llama", "save_hf_folder"]
