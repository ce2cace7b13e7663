"""The sweep directory through pyarrow filesystems: local paths and URIs alike."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nc_ray.config import PackPlan
from nc_ray.schema import SCHEMA_VERSION, rows_to_table
from nc_ray.store import SweepStore


@pytest.fixture(params=["local", "mock"])
def store(request, tmp_path):
    # mock:// is pyarrow's in-memory filesystem: the code path of s3:// or gs:// without a network.
    return SweepStore(str(tmp_path / "sweep") if request.param == "local" else "mock:///bucket/sweeps/demo")


def test_tables_round_trip_with_nulls_for_nan(store):
    rows = [{"member_id": "m1", "pack_id": "p", "epoch": 3, "layer": 1, "tcv_rel": math.nan, "bound_ok": True, "rank_rel_1e2": 7}]
    store.write_table("metrics", "p-e000003", rows)
    table = store.read_table("metrics")
    assert table.num_rows == 1
    assert table["tcv_rel"].to_pylist() == [None]
    assert table["rank_rel_1e2"].to_pylist() == [7]
    assert store.list_files("tables/metrics", ".parquet") == ["p-e000003.parquet"]
    store.write_table("metrics", "p-e000003", rows)  # a retried trial rewrites the same file
    assert store.read_table("metrics").num_rows == 1


def test_empty_table_has_the_schema(store):
    table = store.read_table("members", ["member_id", "status"])
    assert table.num_rows == 0 and table.column_names == ["member_id", "status"]
    assert store.member_statuses() == {}


def test_published_files_carry_the_schema_version(tmp_path):
    local = SweepStore(str(tmp_path))
    local.write_table("spectra", "p-e000000", [{"member_id": "m", "epoch": 0, "layer": 1, "singular_values": [2.0, 1.0]}])
    metadata = pq.read_schema(tmp_path / "tables" / "spectra" / "p-e000000.parquet").metadata
    assert metadata[b"nc_ray.schema_version"] == str(SCHEMA_VERSION).encode()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_packs_round_trip_typed(store):
    from tests.test_spec import member

    pack = PackPlan.of([member(seed=0), member(seed=1)])
    store.write_pack(pack)
    assert store.pack_ids() == [pack.pack_id] and store.read_pack(pack.pack_id) == pack
    store.delete(f"packs/{pack.pack_id}.json")
    assert store.pack_ids() == []


def test_weights_and_state_round_trip(store):
    from nc_ray.trial import read_state, read_weights, write_state, write_weights

    write_weights(store, "abc", {"m1/W1": torch.eye(3)})
    assert torch.equal(read_weights(store, "abc")["m1/W1"], torch.eye(3))
    assert read_state(store, "abc") is None
    write_state(store, "abc", {"epoch": 4, "tensor": torch.arange(3)})
    assert read_state(store, "abc")["epoch"] == 4


def test_rows_to_table_rejects_wrong_types_and_unknown_columns():
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        rows_to_table("metrics", [{"member_id": "m", "epoch": "three"}])
    with pytest.raises(ValueError, match="no column.*momentum"):
        rows_to_table("metrics", [{"member_id": "m", "momentum": 0.9}])


def test_every_config_field_is_a_column_of_members_and_planned():
    import dataclasses

    from nc_ray.config import MemberConfig
    from nc_ray.schema import PLANNED_SCHEMA, SCHEMAS

    for field in dataclasses.fields(MemberConfig):
        assert field.name in SCHEMAS["members"].names and field.name in PLANNED_SCHEMA.names, field.name


def test_doctor_lists_and_quarantines_damaged_files(tmp_path, capsys):
    from nc_ray.cli import main

    store = SweepStore(str(tmp_path))
    for epoch in (0, 1):
        store.write_table("metrics", f"p-e{epoch:06d}", [{"member_id": "m", "epoch": epoch, "layer": 1}])
    store.write_table("members", "p", [{"member_id": "m", "pack_id": "p", "status": "complete"}])
    damaged = tmp_path / "tables" / "metrics" / "p-e000001.parquet"
    damaged.write_bytes(b"PAR1 not really")
    assert main(["doctor", str(tmp_path)]) == 1
    assert str(damaged) in capsys.readouterr().out
    assert store.read_table("metrics")["epoch"].to_pylist() == [0]  # the rest still reads
    assert main(["doctor", str(tmp_path), "--quarantine"]) == 0
    assert not damaged.exists() and (tmp_path / "quarantine" / "metrics" / "p-e000001.parquet").exists()
    assert store.member_statuses() == {}  # the pack counts as unfinished: the next sweep retrains it
    assert (tmp_path / "quarantine" / "members" / "p.parquet").exists()
    assert main(["doctor", str(tmp_path)]) == 0
