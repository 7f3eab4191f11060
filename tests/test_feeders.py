"""Feeder builders: topology, DER sites, zones, ratings, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from evgrid.grid.feeders import (
    FEEDER14_STATION_NODES,
    FEEDERS,
    SEED003_PV_KW,
    build_city,
    build_feeder,
)
from tests.conftest import feeder


def test_unknown_feeder_names_the_choices():
    with pytest.raises(ValueError, match="feeder: unknown feeder 'ieee34'; expected one of ieee33, feeder14, cigre_mv"):
        build_feeder("ieee34")


@pytest.mark.parametrize("name", FEEDERS)
def test_feeder_arrays_are_consistent(name):
    f = feeder(name)
    assert f.tree is not None, f.mesh_error
    assert f.tree.parent[0] == -1 and (f.tree.parent[1:] < np.arange(1, f.tree.n_node)).all()
    assert f.vn_kv.shape == f.v_min_pu.shape == f.base_p_kw.shape == (f.n_bus,)
    assert (f.line_i_max_ka > 0).all() and (f.line_i_max_ka < 1e3).all()
    assert sorted(np.concatenate(f.zones).tolist()) == list(range(f.n_bus))
    assert f.base_p_kw.sum() > 0


def test_ieee33_is_baran_wu():
    f = feeder("ieee33")
    assert f.n_bus == 33 and f.n_line == 32  # five tie lines open
    assert f.base_p_kw.sum() == pytest.approx(3715.0)
    assert f.base_q_kvar.sum() == pytest.approx(2300.0)
    assert f.n_zone == 3


def test_ieee33_seed003_der_sites():
    f = build_feeder("ieee33", der=True)
    pv = {int(f.bus_ids[b]) + 1: p for b, k, p in zip(f.der_bus, f.der_kind, f.der_p_max_kw) if k == "pv"}
    assert pv == {k: float(v) for k, v in SEED003_PV_KW.items()}
    kinds = list(f.der_kind)
    assert kinds.count("wind") == 1 and kinds.count("diesel") == 1
    assert f.der_p_max_kw[kinds.index("wind")] == 200 and int(f.bus_ids[f.der_bus[kinds.index("wind")]]) == 32
    assert f.base_p_kw.sum() == pytest.approx(3715.0)  # DER are sites, not load


def test_feeder14_has_the_seed001_station_nodes():
    f = feeder("feeder14")
    assert f.n_bus == 14 and f.n_line == 13
    names = f.net.bus.name.tolist()
    for node in FEEDER14_STATION_NODES:
        assert str(node) in names
    # lowest voltage at nominal residential peak ~0.97 p.u. as in seed 001
    assert 0.96 < f.net.res_bus.vm_pu.min() < 0.98


def test_zones_are_validated():
    with pytest.raises(ValueError, match="zones: bus 99 in zone 1 is not a bus"):
        build_feeder("feeder14", zones=[[0, 1], [99]])
    with pytest.raises(ValueError, match="zones: bus 1 is in zone 0 and zone 1"):
        build_feeder("feeder14", zones=[list(range(14)), [1]])
    with pytest.raises(ValueError, match=r"zones: buses \[13\] belong to no zone"):
        build_feeder("feeder14", zones=[list(range(13))])
    with pytest.raises(ValueError, match="n_zones: expected 1..14"):
        build_feeder("feeder14", n_zones=15)


@pytest.mark.parametrize("n_zones", [2, 3, 4, 5])
def test_automatic_zones_are_connected(n_zones):
    f = build_feeder("ieee33", n_zones=n_zones)
    assert f.n_zone == n_zones
    net = f.net
    edges = [(int(a), int(b)) for a, b, ok in zip(net.line.from_bus, net.line.to_bus, net.line.in_service) if ok]
    for members in f.zones:
        ids = set(f.bus_ids[members].tolist())
        seen, stack = set(), [next(iter(ids))]
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            stack += [b if a == u else a for a, b in edges if u in (a, b) and (b if a == u else a) in ids]
        assert seen == ids, f"zone {sorted(ids)} is not connected"


def test_voltage_limits_are_validated():
    with pytest.raises(ValueError, match="v_min_pu, v_max_pu"):
        build_feeder("ieee33", v_min_pu=1.02)


def test_city_has_distinct_load_shapes():
    city = build_city(3)
    assert city.n_network == 3
    assert city.load_kinds == ("residential", "commercial", "industrial")
    assert len({f.name for f in city.feeders}) == 3
    with pytest.raises(ValueError, match="load_kinds: unknown kind 'farm'"):
        build_city(2, load_kinds=["residential", "farm"])
    with pytest.raises(ValueError, match="n_networks"):
        build_city(0)


@pytest.mark.parametrize("name", FEEDERS)
def test_each_feeder_numbers_its_buses_as_its_source_does(name):
    """Configs name buses in the source's own numbering; the numbers the config checks use before building a
    feeder are the built feeder's, and a bus outside them is an error naming the field and the numbering."""
    from evgrid.grid.config import FEEDER_BUS_NUMBERS

    f = build_feeder(name)
    first, last = FEEDER_BUS_NUMBERS[name]
    np.testing.assert_array_equal(np.sort(f.numbers), np.arange(first, last + 1))
    assert f.position_of(int(f.numbers[f.slack_bus])) == f.slack_bus
    with pytest.raises(ValueError, match=rf"stations.buses: {last + 1} is not a bus of feeder '{name}'.*{first}-{last}"):
        f.position_of(last + 1, "stations.buses")


def test_paper_numbers_name_the_papers_buses():
    """IEEE 33 and seed 001's feeder count from 1 at the substation (bus 1 = pandapower bus 0)."""
    for name in ("ieee33", "feeder14"):
        f = build_feeder(name)
        assert f.numbers[f.slack_bus] == 1
    f14 = build_feeder("feeder14")
    assert [str(f14.net.bus.name.loc[f14.bus_ids[f14.position_of(k)]]) for k in (5, 9, 13)] == ["5", "9", "13"]
