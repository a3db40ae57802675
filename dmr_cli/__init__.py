"""dmr: a Python clone of Docker Model Runner."""

__version__ = "0.1.0"
