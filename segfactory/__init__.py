"""segfactory: semantic segmentation without manual labels."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("segfactory")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
