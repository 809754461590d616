"""The ``palmchat`` command line: one entry point for the server, the trainer and operators.

It sits above ``server``, ``trainer``, ``demo`` and ``bench``: each command parses its options
and calls into the package that owns the work. Heavy imports (torch, the server) happen inside
the commands so ``palmchat --help`` stays fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("palmchat")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
