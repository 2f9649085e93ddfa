"""refine with class prototypes (ours): pooled over every image before the run, saved beside the
masks, reused on resume, read from a file; masks that depend neither on the worker count nor on
the selection."""
import numpy as np
import pytest
from helpers_h5 import last_run, make_dataset, make_records, masks_in, pixels_in, read_json, run_refine

from dhr_label.core.prototypes import Prototypes, add_sums, finish, image_sums
from dhr_label.io.contract import CamsFile, FeatsFile
from dhr_label.io.inputs import load_inputs
from dhr_label.runtime.prototypes import CHUNK, FILE_NAME, PoolJob, RunPrototypes, load, pool, save

N = 2 * CHUNK + 5  # three chunks of ids, the last one short
OURS = ("--prototype-weight", "0.75", "--wss-heat-weight", "0.5")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("protos") / "in", N, size=(16, 24), feat_dim=6, seed=5)


@pytest.fixture(scope="module")
def pooled(data, tmp_path_factory):
    """Masks of a one-worker run with the prototypes, and its directory."""
    out = tmp_path_factory.mktemp("pooled") / "masks"
    result = run_refine(data, out, *OURS)
    assert result.exit_code == 0, result.stderr
    return out, masks_in(out)


def test_the_run_pools_every_image_and_saves_the_prototypes(data, pooled):
    out, _ = pooled
    record = last_run(out)["prototypes"]
    assert record.pop("seconds") > 0
    assert record == {"source": "pooled", "file": str(out / FILE_NAME), "images": N, "skipped": 0, "unreadable": 0,
                      "available": True}
    sums = None  # what the core's map/reduce gives over the base masks of every image
    with CamsFile.open(data.cams) as cams, FeatsFile.open(data.feats) as feats:
        for image_id in data.ids:
            inputs = load_inputs(image_id, cams, feats, uss=True, wss=True)
            sums = add_sums(sums, image_sums(inputs.base, inputs.uss, inputs.wss, len(data.classes)))
    expected = finish(sums)
    saved, meta = load(out / FILE_NAME, num_classes=len(data.classes), wss=True)
    np.testing.assert_allclose(saved.uss, expected.uss, atol=1e-6)
    assert len(saved.wss) == 2
    for got, want in zip(saved.wss, expected.wss):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert meta["images"] == N and meta["fingerprint_id"] == last_run(out)["fingerprint_id"]


def test_the_prototypes_reach_every_worker(data, pooled, tmp_path):
    out, masks = pooled
    pooled_protos, _ = load(out / FILE_NAME, num_classes=len(data.classes), wss=True)
    order = np.roll(np.arange(len(data.classes)), 1)  # every class gets another class's prototype
    swapped = Prototypes(pooled_protos.uss[order], tuple(layer[order] for layer in pooled_protos.wss))
    path = tmp_path / "swapped.npz"
    save(path, RunPrototypes(swapped, "file", None, N, 0), fingerprint_id="test")
    alone = ("--prototype-weight", "1", "--wss-heat-weight", "0", "--guard", "0")  # the prototypes decide
    result = run_refine(data, tmp_path / "swapped", *alone, "--prototypes", str(path), workers=2)
    assert result.exit_code == 0, result.stderr
    result = run_refine(data, tmp_path / "right", *alone, "--prototypes", str(out / FILE_NAME), workers=2)
    assert result.exit_code == 0, result.stderr
    swapped_masks, right = pixels_in(tmp_path / "swapped"), pixels_in(tmp_path / "right")
    assert sum(swapped_masks[i] != right[i] for i in right) > N // 2


def test_masks_do_not_depend_on_the_worker_count_or_the_selection(data, pooled, tmp_path):
    out, masks = pooled
    two = tmp_path / "two"
    assert run_refine(data, two, *OURS, workers=2).exit_code == 0
    assert masks_in(two) == masks
    ids = tmp_path / "ids.txt"
    chosen = data.ids[3:9]
    ids.write_text("\n".join(chosen) + "\n")
    some = tmp_path / "some"
    assert run_refine(data, some, *OURS, "--ids", str(ids), workers=2).exit_code == 0
    assert last_run(some)["prototypes"]["images"] == N  # every image of the cams file, not the selection
    assert masks_in(some) == {i: masks[i] for i in chosen}


def test_a_resumed_run_reads_the_saved_prototypes(data, pooled, tmp_path):
    out, masks = pooled
    again = tmp_path / "again"
    assert run_refine(data, again, *OURS, "--limit", "4").exit_code == 0
    (again / f"{data.ids[0]}.png").unlink()
    result = run_refine(data, again, *OURS)
    assert result.exit_code == 0, result.stderr
    assert last_run(again)["prototypes"]["source"] == "reused"
    assert masks_in(again) == masks


def test_a_prototypes_file_replaces_the_pooling(data, pooled, tmp_path):
    out, masks = pooled
    given = tmp_path / "given"
    result = run_refine(data, given, *OURS, "--prototypes", str(out / FILE_NAME))
    assert result.exit_code == 0, result.stderr
    assert last_run(given)["prototypes"]["source"] == "file"
    assert not (given / FILE_NAME).exists()
    assert pixels_in(given) == pixels_in(out)


def test_a_prototypes_file_of_other_classes_is_refused_before_any_image(data, tmp_path):
    other = make_dataset(tmp_path / "other", 3, preset="camvid", feat_dim=6, seed=2)
    first = tmp_path / "first"
    assert run_refine(other, first, *OURS).exit_code == 0
    out = tmp_path / "masks"
    result = run_refine(data, out, *OURS, "--prototypes", str(first / FILE_NAME))
    assert result.exit_code == 1
    assert f"prototypes {first / FILE_NAME}" in result.stderr
    assert f"expected {len(data.classes)} classes" in result.stderr and f"found {len(other.classes)}" in result.stderr
    assert masks_in(out) == {}


def test_features_of_another_dimension_fail_their_images_by_name(data, pooled, tmp_path):
    out, _ = pooled
    wide = make_dataset(tmp_path / "wide", 2, feat_dim=9, seed=3)
    result = run_refine(wide, tmp_path / "masks", *OURS, "--prototypes", str(out / FILE_NAME))
    assert result.exit_code == 1
    assert "img_000" in result.stderr and "the prototypes have dimensions [6" in result.stderr


def test_without_base_masks_the_run_says_it_used_the_papers_centroids(tmp_path):
    data = make_dataset(tmp_path / "in", 4, with_base=False, seed=4)
    out = tmp_path / "masks"
    result = run_refine(data, out, *OURS[:2])
    assert result.exit_code == 0, result.stderr
    assert "no image of" in result.stderr and "has a base mask" in result.stderr
    assert last_run(out)["prototypes"]["available"] is False
    paper = tmp_path / "paper"
    assert run_refine(data, paper).exit_code == 0
    assert pixels_in(out) == pixels_in(paper)


def test_pooling_reads_base_masks_and_features_only(data, monkeypatch):
    read = []
    for name in ("read_cam", "read_image"):
        original = getattr(CamsFile, name)
        monkeypatch.setattr(CamsFile, name, lambda self, *a, _o=original, _n=name, **k: read.append(_n) or _o(self, *a, **k))
    run = pool(PoolJob(data.cams, data.feats, len(data.classes), wss=True), workers=1)
    assert run.images == N and read == []


def test_the_summary_says_why_images_were_not_pooled(tmp_path):
    records = make_records(4, size=(16, 24), feat_dim=6, seed=3)
    records["img_001"]["base"] = None  # nothing to pool from
    records["img_002"]["uss"] = None  # a base mask, but no features to pool
    data = make_dataset(tmp_path / "in", records=records)
    out = tmp_path / "masks"
    result = run_refine(data, out, *OURS)
    assert result.exit_code == 1  # img_002 fails in the run, naming its missing dataset
    assert "failed img_002" in result.stderr and "/img_002/uss" in result.stderr
    assert ("class prototypes: pooled from the base masks of 2 images (1 without a base mask; 1 whose base mask or "
            "features could not be read: refining it fails and says why)") in " ".join(result.stderr.split())
    record = last_run(out)["prototypes"]
    assert (record["images"], record["skipped"], record["unreadable"]) == (2, 2, 1)


def test_the_api_gives_the_clis_masks_given_the_same_prototypes(data, pooled):
    # The README's promise: dhr_label.refine_image equals refine's masks when it gets the prototypes the
    # command line pooled (from every base mask of the cams file) and its parameters.
    from PIL import Image
    from threadpoolctl import threadpool_limits

    import dhr_label
    from dhr_label import DHRParams

    out, _ = pooled
    prototypes, _ = load(out / FILE_NAME, num_classes=len(data.classes), wss=True)
    params = DHRParams.from_dict(read_json(out / "dhr-label-manifest.json")["parameters"])
    with CamsFile.open(data.cams) as cams, FeatsFile.open(data.feats) as feats, threadpool_limits(limits=1):
        for image_id in data.ids[:4]:
            i = load_inputs(image_id, cams, feats, uss=True, wss=True)
            state = dhr_label.refine_image(i.cam, i.labels, image=i.image, base=i.base, uss=i.uss, wss=i.wss,
                                           background=data.background, params=params, prototypes=prototypes)
            np.testing.assert_array_equal(state.mask, np.asarray(Image.open(out / f"{image_id}.png")), err_msg=image_id)
