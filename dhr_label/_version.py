"""The version of dhr-label: the one source, read by pyproject.toml (``[tool.setuptools.dynamic]``)
and by every module that records it (manifests, fingerprints, reports)."""
__version__ = "0.5.0"
