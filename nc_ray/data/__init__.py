"""Datasets for nc_ray: a registry of loaders with shared subsampling, standardization and caching.

    ds = load_dataset("mnist", n_per_class=500)   # ds.x_train: float32 (5000, 784)

Downloaded datasets are verified against published MD5s and cached under $NC_RAY_DATA
(default ~/.cache/nc_ray/data) as <name>.npz. `arrays` reads a user's .npz file, `mnist1d` is
generated locally; `resolve_params` checks a dataset's params without loading data and adds the
values it pins (docs/datasets.md).
"""

from nc_ray.data.base import Dataset, DatasetError, ParamError
from nc_ray.data.registry import dataset_names, dataset_params, load_dataset, n_classes_of, prepared_arrays, resolve_params

__all__ = ["Dataset", "DatasetError", "ParamError", "dataset_names", "dataset_params", "load_dataset", "n_classes_of",
           "prepared_arrays", "resolve_params"]
