"""The auto pack size (`planning.auto_pack_size`) and how groups split into packs: small sweeps
keep every slot busy, large sweeps of cheap members get the largest packs, packs of a group are
even. Pure planning: no Ray, no torch, no timing."""

from __future__ import annotations

import math
import pytest

from nc_ray.planning import MAX_AUTO_PACK_SIZE, auto_pack_size, pack_cost, plan_packs, plan_sweep
from nc_ray.spec import parse_spec
from nc_ray.store import SweepStore

TINY = {  # bench/bench_scale.py's members: 2 epochs of a width-8 MLP on 90 samples
    "name": "tiny", "dataset": {"name": "gaussian", "params": {"n_classes": 3, "dim": 8, "samples_per_class": 30, "test_samples_per_class": 10}},
    "model": {"arch": "mlp", "width": 8}, "loss": "ce", "training": {"epochs": 2, "batch_size": 32},
    "grid": {"depth": [2, 3], "weight_decay": {"log_range": [1.0e-4, 1.0e-1], "num": 50}, "seed": {"count": 100}},
    "metrics": {"every": 2, "initial": False}, "resources": {"pack_size": "auto"},
}


# The quickstart's shape as BENCHMARKS.md measured it (jobs/quickstart.yaml may change): 3 depths x 8 λ x 2 seeds.
QUICKSTART = {
    "name": "quick", "dataset": {"name": "digits"}, "model": {"arch": "mlp", "width": 32}, "loss": "mse",
    "training": {"lr": 0.1, "batch_size": 128, "epochs": 1600},
    "grid": {"depth": [4, 6, 8], "weight_decay": {"log_range": [5.0e-4, 6.4e-2], "num": 8}, "seed": [0, 1]},
    "metrics": {"every": 200}, "resources": {"pack_size": "auto"},
}


def quickstart_members():
    return parse_spec(QUICKSTART, source="quickstart").members()


@pytest.mark.parametrize("slots", [1, 2, 3, 8, 48, 64, 1000])
def test_every_slot_gets_a_pack_and_sizes_stay_in_bounds(slots):
    members = quickstart_members()
    size = auto_pack_size(members, slots)
    assert 1 <= size <= MAX_AUTO_PACK_SIZE
    assert math.ceil(len(members) / size) >= min(slots, len(members))


def test_more_slots_never_make_larger_packs():
    members = quickstart_members()
    sizes = [auto_pack_size(members, slots) for slots in range(1, 70)]
    assert sizes == sorted(sizes, reverse=True)


def test_a_large_sweep_of_cheap_members_gets_the_largest_packs():
    members = parse_spec(TINY, source="tiny").members()
    assert len(members) == 10_000
    assert auto_pack_size(members, 2) == auto_pack_size(members, 64) == MAX_AUTO_PACK_SIZE


def test_the_quickstart_on_two_cpus_makes_even_packs_longest_first(tmp_path):
    plan = plan_sweep(parse_spec(QUICKSTART, source="quickstart"), SweepStore(str(tmp_path)), {"CPU": 2})
    # 3 depths x 16 members: each depth in two packs of 8 (not 12 and 4), two packs per slot.
    assert sorted(len(p.members) for p in plan.packs) == [8] * 6
    ordered = sorted(plan.packs, key=pack_cost, reverse=True)
    assert [p.first.depth for p in ordered] == [8, 8, 6, 6, 4, 4]


@pytest.mark.parametrize(("group", "pack_size", "sizes"), [(16, 12, [8, 8]), (65, 64, [33, 32]), (64, 64, [64]), (5, 1, [1] * 5), (7, 3, [2, 2, 3])])
def test_a_group_splits_into_the_fewest_even_packs(group, pack_size, sizes):
    spec = parse_spec({**TINY, "grid": {"weight_decay": {"log_range": [1.0e-4, 1.0e-1], "num": group}}}, source="group")
    members = spec.members()
    packs = plan_packs(members, [], {}, pack_size)
    assert sorted(len(p.members) for p in packs) == sorted(sizes)
    assert sorted(m.member_id for p in packs for m in p.members) == sorted(m.member_id for m in members)
