"""``dhr-label score`` end to end on tiny masks with hand-computed answers."""
import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dhr_label.cli import app
from dhr_label.io.masks import write_mask
from dhr_label.presets import voc_palette

TOL = 1e-12
runner = CliRunner()

# 18 labelled pixels: class 0 = 12, class 1 = 6, two ignored.
GT = np.array([
    [0, 0, 0, 1, 1],
    [0, 0, 0, 1, 1],
    [0, 0, 0, 1, 1],
    [255, 255, 0, 0, 0],
], dtype=np.uint8)
# Column 2 of the first three rows predicted 1: class 0 loses 3 pixels to class 1.
DEGRADED = GT.copy()
DEGRADED[:3, 2] = 1
DEGRADED[3, :2] = 0  # predictions on ignored pixels do not count


def write(directory, masks: dict):
    directory.mkdir(parents=True, exist_ok=True)
    for image_id, mask in masks.items():
        write_mask(directory / f"{image_id}.png", np.asarray(mask, dtype=np.uint8), voc_palette())
    return directory


def score(*args):
    return runner.invoke(app, ["score", *map(str, args)])


def as_json(result):
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def by_name(report):
    return {row["name"]: row for row in report["per_class"]}


def test_ground_truth_against_itself_is_100(tmp_path):
    gt = write(tmp_path / "gt", {"a": GT, "b": np.where(GT == 1, 15, GT)})
    result = score("--pred", gt, "--gt", gt)
    assert result.exit_code == 0
    assert "mIoU 100.00" in result.stdout
    assert "error" not in result.stderr
    report = as_json(score("--pred", gt, "--gt", gt, "--json"))
    assert report["summary"]["miou"] == 1.0
    assert report["summary"]["classes_present"] == 3
    assert report["summary"]["vanished"] == {"pairs": 4, "vanished": 0, "rate": 0.0}


def test_degradation_gives_hand_computed_scores(tmp_path):
    gt = write(tmp_path / "gt", {"a": GT})
    pred = write(tmp_path / "pred", {"a": DEGRADED})
    report = as_json(score("--pred", pred, "--gt", gt, "--json"))
    rows = by_name(report)
    bg, plane = rows["background"], rows["aeroplane"]
    assert (bg["tp"], bg["fn"], bg["fp"], bg["gt_pixels"]) == (9, 3, 0, 12)
    assert (plane["tp"], plane["fp"], plane["pred_pixels"]) == (6, 3, 9)
    assert bg["iou"] == pytest.approx(9 / 12, abs=TOL)
    assert plane["iou"] == pytest.approx(6 / 9, abs=TOL)
    assert plane["precision"] == pytest.approx(6 / 9, abs=TOL)
    assert bg["recall"] == pytest.approx(9 / 12, abs=TOL)
    assert plane["fp_union"] == pytest.approx(3 / 9, abs=TOL)
    assert bg["fn_union"] == pytest.approx(3 / 12, abs=TOL)
    assert plane["fpr"] == pytest.approx(3 / (3 + 9), abs=TOL)  # TN of class 1 = 18 - 6 - 3
    s = report["summary"]
    assert s["miou"] == pytest.approx((9 / 12 + 6 / 9) / 2, abs=TOL)
    assert s["pixel_accuracy"] == pytest.approx(15 / 18, abs=TOL)
    assert s["fwiou"] == pytest.approx(12 / 18 * 9 / 12 + 6 / 18 * 6 / 9, abs=TOL)
    assert s["classes_present"] == 2
    assert rows["bird"]["present"] is False and rows["bird"]["iou"] is None
    table = score("--pred", pred, "--gt", gt).stdout
    assert "mIoU 70.83" in table
    assert "absent" in table  # the 19 classes in neither mask


def test_predicted_ignore_and_unknown_ids_count_as_wrong(tmp_path):
    gt = write(tmp_path / "gt", {"a": GT})
    pred = GT.copy()
    pred[0, 0] = 255  # "ignore" predicted on a labelled pixel
    pred[0, 1] = 40  # not a VOC class
    report = as_json(score("--pred", write(tmp_path / "pred", {"a": pred}), "--gt", gt, "--json"))
    bg = by_name(report)["background"]
    assert (bg["tp"], bg["fn"], bg["fp"]) == (10, 2, 0)
    assert bg["iou"] == pytest.approx(10 / 12, abs=TOL)
    assert report["summary"]["invalid_pred_pixels"] == 2


def test_missing_prediction_is_an_error_naming_count_and_ids(tmp_path):
    gt = write(tmp_path / "gt", {"a": GT, "b": GT, "c": GT})
    pred = write(tmp_path / "pred", {"a": GT})
    result = score("--pred", pred, "--gt", gt)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "2 of 3 ground-truth masks have no prediction" in result.stderr
    assert "b, c" in result.stderr and "--allow-missing" in result.stderr


def test_allow_missing_scores_them_all_wrong_and_reports_the_count(tmp_path):
    gt = write(tmp_path / "gt", {"a": GT, "b": GT})
    pred = write(tmp_path / "pred", {"a": GT})
    result = score("--pred", pred, "--gt", gt, "--allow-missing", "--json")
    report = as_json(result)
    assert report["images"]["missing"] == 1 and report["images"]["missing_ids"] == ["b"]
    assert "1 of 2 ground-truth masks have no prediction" in result.stderr
    bg = by_name(report)["background"]
    # "a" perfect, "b" every labelled pixel wrong: class 0 = 12 of 24 right, no FP
    assert bg["iou"] == pytest.approx(12 / 24, abs=TOL)
    assert report["summary"]["pixel_accuracy"] == pytest.approx(18 / 36, abs=TOL)
    images = {row["id"]: row for row in report["per_image"]}
    assert images["b"]["missing"] is True and images["b"]["miou"] == 0.0


def test_size_mismatch_names_id_and_both_shapes(tmp_path):
    gt = write(tmp_path / "gt", {"a": GT, "b": GT})
    pred = write(tmp_path / "pred", {"a": GT, "b": np.zeros((5, 4), np.uint8)})
    result = score("--pred", pred, "--gt", gt)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "b: " in result.stderr and "5 x 4" in result.stderr and "4 x 5" in result.stderr
    assert "Traceback" not in result.stderr


def test_ground_truth_outside_the_preset_is_an_error(tmp_path):
    gt = write(tmp_path / "gt", {"a": np.full((2, 2), 30, np.uint8)})
    result = score("--pred", gt, "--gt", gt)
    assert result.exit_code == 1
    assert "ids 30 outside the 21 classes" in result.stderr


def test_unknown_predictions_are_reported_not_scored(tmp_path):
    gt = write(tmp_path / "gt", {"a": GT})
    pred = write(tmp_path / "pred", {"a": GT, "zz": GT})
    result = score("--pred", pred, "--gt", gt, "--json")
    report = as_json(result)
    assert report["images"]["unknown_pred_ids"] == ["zz"] and report["images"]["scored"] == 1
    assert "1 masks in" in result.stderr and "zz" in result.stderr


def test_ids_file_restricts_the_images(tmp_path):
    gt = write(tmp_path / "gt", {"a": GT, "b": GT})
    pred = write(tmp_path / "pred", {"a": DEGRADED})  # b missing, but not asked for
    (tmp_path / "ids.txt").write_text("a\n")
    report = as_json(score("--pred", pred, "--gt", gt, "--ids", tmp_path / "ids.txt", "--json"))
    assert report["images"]["scored"] == 1 and report["images"]["unknown_pred"] == 0


def test_pred_defaults_to_refines_output_directory(tmp_path, monkeypatch):
    write(tmp_path / "gt", {"a": GT})
    write(tmp_path / "masks", {"a": DEGRADED})
    monkeypatch.chdir(tmp_path)
    report = as_json(score("--gt", "gt", "--json"))
    assert report["pred"] == "masks"
    assert report["summary"]["miou"] == pytest.approx((9 / 12 + 6 / 9) / 2, abs=TOL)


def test_compare_reports_deltas_and_gainers(tmp_path):
    gt = write(tmp_path / "gt", {"a": GT, "b": GT})
    dhr = write(tmp_path / "dhr", {"a": GT, "b": DEGRADED})
    base = write(tmp_path / "base", {"a": DEGRADED, "b": DEGRADED})
    result = score("--pred", dhr, "--gt", gt, "--compare", base, "--json")
    comparison = as_json(result)["comparison"]
    degraded_miou = (9 / 12 + 6 / 9) / 2
    assert comparison["images"]["better"] == 1 and comparison["images"]["same"] == 1
    assert comparison["images"]["worse"] == 0
    [gain] = comparison["images"]["gained_most"]
    assert gain["id"] == "a" and gain["delta_miou"] == pytest.approx(1 - degraded_miou, abs=TOL)
    assert comparison["images"]["lost_most"] == []
    bg = {row["name"]: row for row in comparison["per_class"]}["background"]
    # dhr: class 0 = 21 of 24 right, no FP; base: 18 of 24
    assert bg["delta_iou"] == pytest.approx(21 / 24 - 18 / 24, abs=TOL)
    table = score("--pred", dhr, "--gt", gt, "--compare", base)
    assert table.exit_code == 0 and "1 better, 0 worse, 1 the same" in table.stdout


def test_csv_directory_holds_the_numbers(tmp_path):
    gt = write(tmp_path / "gt", {"a": GT})
    pred = write(tmp_path / "pred", {"a": DEGRADED})
    out = tmp_path / "csv"
    result = score("--pred", pred, "--gt", gt, "--csv", out)
    assert result.exit_code == 0
    with open(out / "classes.csv") as handle:
        classes = {row["name"]: row for row in csv.DictReader(handle)}
    assert float(classes["aeroplane"]["iou"]) == pytest.approx(6 / 9, abs=TOL)
    assert classes["bird"]["iou"] == ""  # absent: undefined, not 0
    with open(out / "confusion.csv") as handle:
        confusion = {row["gt"]: row for row in csv.DictReader(handle)}
    assert confusion["background"]["background"] == "9" and confusion["background"]["aeroplane"] == "3"
    with open(out / "images.csv") as handle:
        [image] = list(csv.DictReader(handle))
    assert image["id"] == "a" and image["labelled_pixels"] == "18"
    with Image.open(out / "confusion.png") as picture:
        assert picture.mode == "RGB" and min(picture.size) > 200


def test_workers_do_not_change_the_numbers(tmp_path):
    rng = np.random.default_rng(3)
    masks = {f"m{i:02d}": rng.integers(0, 4, (6, 7)) for i in range(12)}
    preds = {k: np.where(rng.random(v.shape) < 0.3, 3 - v, v) for k, v in masks.items()}
    gt, pred = write(tmp_path / "gt", masks), write(tmp_path / "pred", preds)
    one = as_json(score("--pred", pred, "--gt", gt, "--json", "--workers", "1"))
    two = as_json(score("--pred", pred, "--gt", gt, "--json", "--workers", "2"))
    assert one == two


def test_bad_option_is_a_usage_error(tmp_path):
    result = score("--gt", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert result.stdout == ""


# -- --compare: which classes a setting rescues or loses (vanished pairs per class) -------------
# 24 labelled pixels: background 12, aeroplane (1) 6, bicycle (2) 6; every class eligible.
THREE = np.array([
    [0, 0, 1, 1, 2, 2],
    [0, 0, 1, 1, 2, 2],
    [0, 0, 1, 1, 2, 2],
    [0, 0, 0, 0, 0, 0],
], dtype=np.uint8)


def _without(mask, cls):
    """``mask`` with class ``cls`` handed to the background: that (image, class) pair vanishes (IoU 0)."""
    return np.where(mask == cls, 0, mask)


def test_compare_counts_the_vanished_pairs_each_class_rescues_and_loses(tmp_path):
    gt = write(tmp_path / "gt", {"a": THREE, "b": THREE, "c": THREE})
    # a: PRED rescues the aeroplane COMPARE lost; b: PRED loses the bicycle COMPARE kept; c: both lose the aeroplane.
    pred = write(tmp_path / "pred", {"a": THREE, "b": _without(THREE, 2), "c": _without(THREE, 1)})
    other = write(tmp_path / "other", {"a": _without(THREE, 1), "b": THREE, "c": _without(THREE, 1)})
    comparison = as_json(score("--pred", pred, "--gt", gt, "--compare", other, "--json"))["comparison"]
    rows = {row["name"]: row for row in comparison["per_class"]}
    keys = ("vanished_pairs_compare", "vanished_pairs", "delta_vanished_pairs", "rescued_pairs", "lost_pairs")
    assert [rows["aeroplane"][k] for k in keys] == [2, 1, -1, 1, 0]
    assert [rows["bicycle"][k] for k in keys] == [0, 1, 1, 0, 1]
    assert [rows["background"][k] for k in keys] == [0, 0, 0, 0, 0]
    v = comparison["vanished"]  # the totals tie, 2 and 2: only the per-class view shows what changed
    assert (v["compare"]["vanished"], v["pred"]["vanished"], v["delta"], v["rescued"], v["lost"]) == (2, 2, 0, 1, 1)

    table = score("--pred", pred, "--gt", gt, "--compare", other)
    assert table.exit_code == 0, table.stderr
    cells = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in table.stdout.splitlines() if line.count("│") == 10}
    assert cells["aeroplane"][3:] == ["2/3", "1/3", "-1", "1", "0"]
    assert cells["bicycle"][3:] == ["0/3", "1/3", "+1", "0", "1"]
    assert cells["mIoU / all pairs"][3:] == ["2/9", "2/9", "+0", "1", "1"]

    assert score("--pred", pred, "--gt", gt, "--compare", other, "--csv", tmp_path / "csv").exit_code == 0
    with open(tmp_path / "csv" / "classes.csv") as handle:
        written = {row["name"]: row for row in csv.DictReader(handle)}
    assert [written["aeroplane"][k] for k in keys] == ["2", "1", "-1", "1", "0"]
    assert [written["bicycle"][k] for k in keys] == ["0", "1", "1", "0", "1"]


# -- partial and mixed prediction directories ----------------------------------------------------
@pytest.fixture
def labelled(tmp_path):
    """Four generated images (img_001's CAM is broken: refine fails it) and their ground truth."""
    from helpers_h5 import make_dataset, make_records

    records = make_records(4, size=(16, 20))
    records["img_001"]["cam"][0, 0, 0] = np.nan
    data = make_dataset(tmp_path / "in", records=records)
    gt = write(tmp_path / "gt", {i: r["truth"] for i, r in records.items()})
    return data, gt


def test_a_partial_run_is_scored_on_the_images_it_made(labelled, tmp_path):
    from helpers_h5 import run_refine

    data, gt = labelled
    out = tmp_path / "masks"
    assert run_refine(data, out, "--row", "1", "--limit", "3").exit_code == 1  # img_001 failed
    refused = score("--gt", gt, "--pred", out)
    assert refused.exit_code == 1
    assert "2 of 4 ground-truth masks have no prediction" in refused.stderr
    assert "pass --made to score only the images refine made there" in " ".join(refused.stderr.split())
    failed = score("--gt", gt, "--pred", out, "--made", "--json")  # img_003 was never selected; img_001 failed
    assert failed.exit_code == 1
    assert "1 of the 3 images refine made or tried" in json.loads(failed.stdout)["error"]
    report = as_json(score("--gt", gt, "--pred", out, "--made", "--allow-missing", "--json"))
    assert report["images"]["scored"] == 3 and report["images"]["missing_ids"] == ["img_001"]
    assert sorted(i["id"] for i in report["per_image"]) == ["img_000", "img_001", "img_002"]
    ids = tmp_path / "ids.txt"
    ids.write_text("img_000\n")
    both = score("--gt", gt, "--pred", out, "--made", "--ids", ids)
    assert both.exit_code == 2 and "--made and --ids" in both.stderr
    lone = write(tmp_path / "lone", {"img_000": data.records["img_000"]["truth"]})  # masks, no manifest
    result = score("--gt", gt, "--pred", lone, "--made")
    assert result.exit_code == 1 and "holds no dhr-label manifest" in result.stderr


def test_score_warns_when_the_masks_were_made_with_several_settings(labelled, tmp_path):
    from helpers_h5 import run_refine

    data, gt = labelled
    out = tmp_path / "masks"
    run_refine(data, out, "--row", "1", "--ids", str(write_ids(tmp_path, "img_000", "img_002")))
    run_refine(data, out, "--row", "4", "--allow-mixed")  # img_003 with Step 1's settings beside row 1's
    ids = write_ids(tmp_path, "img_000", "img_002", "img_003")
    result = score("--gt", gt, "--pred", out, "--ids", ids, "--json")
    report = as_json(result)
    [warning] = report["warnings"]
    assert "mixes masks made with 2 settings (2 with settings " in warning and ", 1 with settings " in warning
    assert "warning: " in result.stderr and "this score blends them" in " ".join(result.stderr.split())
    alone = as_json(score("--gt", gt, "--pred", out, "--ids", write_ids(tmp_path, "img_000", "img_002"), "--json"))
    assert alone["warnings"] == []  # the masks scored were made with one setting


def write_ids(directory, *ids):
    path = directory / f"ids-{len(ids)}-{ids[0]}.txt"
    path.write_text("\n".join(ids) + "\n")
    return path
