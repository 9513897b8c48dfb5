"""The package version (one place: ``upcycle.__version__``, the CLI's ``--version``, adapter metadata)."""

__version__ = "0.1.0"
