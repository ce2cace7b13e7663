"""nc_ray: distributed sweeps on Ray for deep neural collapse and low-rank bias."""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("nc_ray")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "load_member", "open_sweep"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import nc_ray` stays cheap (no torch) for tools that only read tables.
    if name == "load_member":
        from nc_ray.trial import load_member

        return load_member
    if name == "open_sweep":
        from nc_ray.query import open_sweep

        return open_sweep
    raise AttributeError(f"module 'nc_ray' has no attribute {name!r}")
