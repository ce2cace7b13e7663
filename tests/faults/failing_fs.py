"""A local filesystem whose writes to chosen paths fail: a full disk or a read-only directory,
simulated at the pyarrow filesystem layer that every nc_ray read and write goes through."""

import errno
import fnmatch
import os

import pyarrow as pa
import pyarrow.fs as pafs
import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # Ray workers need not import tests/


class _FillsUp:
    """A writable file object that takes `room` bytes, then fails like a full disk."""

    def __init__(self, stream: pa.NativeFile, room: int):
        self.stream, self.room = stream, room
        self.closed = False

    def write(self, data) -> int:
        if len(data) > self.room:
            self.stream.write(bytes(data)[: self.room])  # what a full disk leaves: a partial file
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()
        self.closed = True


class FailingWrites(pafs.FileSystemHandler):
    """The local filesystem, except that opening a file for writing at a path matching `pattern`
    fails with `error` (EROFS: at once; ENOSPC: after half the bytes of a typical table file)."""

    def __init__(self, pattern: str, error: int):
        self.pattern, self.error = pattern, error
        self.local = pafs.LocalFileSystem()

    def __eq__(self, other) -> bool:
        return isinstance(other, FailingWrites) and (other.pattern, other.error) == (self.pattern, self.error)

    def open_output_stream(self, path, metadata):
        if not fnmatch.fnmatch(path, self.pattern):
            return self.local.open_output_stream(path, metadata=metadata)
        if self.error == errno.ENOSPC:
            return pa.PythonFile(_FillsUp(self.local.open_output_stream(path), room=1024), mode="w")
        raise OSError(self.error, os.strerror(self.error), path)

    def get_type_name(self):
        return "failing-writes"

    def normalize_path(self, path):
        return self.local.normalize_path(path)

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to empty the root directory")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path, metadata=metadata)


def failing_filesystem(pattern: str, error: int) -> pafs.PyFileSystem:
    return pafs.PyFileSystem(FailingWrites(pattern, error))
