"""Activation cache: run the LLM once and write layer activations to a Zarr store.

The reader side (`cache.store.open_store`) is what `trainer/` uses; it needs no LLM.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featureforget")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
