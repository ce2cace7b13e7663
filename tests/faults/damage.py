"""Damage done to a finished sweep's table files after publication, as disks, people and scripts do
it: a file deleted, truncated, overwritten with garbage, a page corrupted behind an intact footer,
a valid file copied onto another name, a valid Parquet file of a foreign schema dropped in."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def delete(path: Path) -> None:
    path.unlink()


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garbage(path: Path) -> None:
    path.write_bytes(b"PAR1" + bytes(range(256)) * 8 + b"PAR1")


def column_chunk(path: Path, column: str) -> tuple[int, int]:
    """(first byte, length) of a column's pages in the first row group."""
    group = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema.split(".")[0] == column)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    return start, chunk.total_compressed_size


def corrupt_page(path: Path, column: str, at: float = 0.5) -> None:
    """Flip one byte inside the pages of `column` (at fraction `at` of them): the footer stays
    intact. At 0 it is the first page's header, which no reader gets past; inside page data, a
    reader that skips the page checksums (DuckDB) may decode wrong values without an error."""
    start, length = column_chunk(path, column)
    data = bytearray(path.read_bytes())
    data[start + min(length - 1, int(length * at))] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_onto(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)


def foreign(path: Path) -> None:
    """A valid Parquet file whose columns are not those of any table."""
    pq.write_table(pa.table({"x": [1, 2], "note": ["not", "ours"]}), path)


def pack_files(sweep: Path, table: str, depth: int) -> list[Path]:
    """The files of `table` that belong to the sweep's pack of members of `depth` (sorted by epoch)."""
    pack_id = next(p.stem for p in (sweep / "packs").glob("*.json") if json.loads(p.read_text())["members"][0]["depth"] == depth)
    return sorted((sweep / "tables" / table).glob(f"{pack_id}*.parquet"))
