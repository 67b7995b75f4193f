"""sn_ext's version: one place, read by the package (sn_ext.__version__) and by pyproject.toml."""

__version__ = "0.1.0"
