"""nc_ray: distributed sweeps on Ray for deep neural collapse and low-rank bias."""

from typing import Any

__all__ = ["__version__", "load_member", "open_sweep"]


def __getattr__(name: str) -> Any:
    # Lazy: `import nc_ray` must not import torch (load_member) or duckdb (open_sweep), nor look
    # up its installed version (importlib.metadata: ~10 ms of every command's start).
    if name == "__version__":
        from nc_ray._version import __version__

        return __version__
    if name == "load_member":
        from nc_ray.trial import load_member

        return load_member
    if name == "open_sweep":
        from nc_ray.query import open_sweep

        return open_sweep
    raise AttributeError(f"module 'nc_ray' has no attribute {name!r}")
