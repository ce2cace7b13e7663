"""The installed version of nc_ray (a leaf: importing it costs nothing)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nc_ray")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
