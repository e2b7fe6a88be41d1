"""The package version, in a module of its own so that any part of glassbox can name it
without importing the package root (which imports nearly everything: a cycle).

Offers:
    __version__
"""

__version__ = "0.1.0"
