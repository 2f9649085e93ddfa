"""The same inputs give byte-identical masks for any ``--workers``, any ``--shard`` split and
across repeated runs (issue 5)."""
from __future__ import annotations

import pytest
from helpers_h5 import last_run, make_dataset, masks_in, run_refine

N = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # Three tags per image and a single-dataset WSS: more classes in play than the defaults.
    tags = [[c, c + 5, c + 10] for c in range(1, N + 1)]
    return make_dataset(tmp_path_factory.mktemp("determinism") / "in", N, size=(24, 32), tags=tags, wss_layers=None)


@pytest.fixture(scope="module")
def one_worker(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "masks"
    result = run_refine(data, out)
    assert result.exit_code == 0, result.stderr
    masks = masks_in(out)
    assert sorted(masks) == data.ids
    return masks


def test_two_workers_write_the_same_bytes(data, one_worker, tmp_path):
    out = tmp_path / "masks"
    result = run_refine(data, out, workers=2)
    assert result.exit_code == 0, result.stderr
    assert last_run(out)["engine"]["workers"] == 2
    assert masks_in(out) == one_worker


@pytest.mark.parametrize("count", [2, 3])
def test_any_shard_split_writes_the_same_bytes(data, one_worker, count, tmp_path):
    shared = tmp_path / "shared"
    owned: list[set[str]] = []
    for index in range(1, count + 1):
        alone = tmp_path / f"shard-{index}"  # each shard by itself: what it owns
        assert run_refine(data, alone, "--shard", f"{index}/{count}").exit_code == 0
        owned.append(set(masks_in(alone)))
        assert run_refine(data, shared, "--shard", f"{index}/{count}").exit_code == 0
    assert set().union(*owned) == set(data.ids)
    assert sum(len(o) for o in owned) == N  # disjoint
    assert masks_in(shared) == one_worker


def test_a_repeated_run_writes_the_same_bytes(data, one_worker, tmp_path):
    out = tmp_path / "masks"
    for _ in range(2):
        assert run_refine(data, out, "--overwrite").exit_code == 0
        assert masks_in(out) == one_worker
