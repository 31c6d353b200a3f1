"""residtap's version, in a module of its own so that any module can record it in the files it
writes without importing the package (whose __init__ imports every feature)."""

__version__ = "0.1.0"
