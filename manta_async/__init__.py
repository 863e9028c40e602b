"""manta-async: keep a current copy of chosen SQL views on a remote store."""

__version__ = "0.1.0"
