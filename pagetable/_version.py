"""The package version, defined once: pyproject.toml reads it for the distribution's
metadata (``[tool.setuptools.dynamic]``) and the package exposes it as ``__version__``."""

__version__ = "0.1.0"
