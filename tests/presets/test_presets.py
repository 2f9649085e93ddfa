"""Dataset presets: class lists, background ids, palettes, class-list files, agreement checks."""
from __future__ import annotations

import json
import re

import pytest

from dhr_label.errors import DHRLabelError
from dhr_label.presets import (
    IGNORE_INDEX,
    PRESET_NAMES,
    PRESETS,
    check_agreement,
    classes_json,
    load_class_file,
    preset_from_classes,
    resolve_preset,
    voc_palette,
)
from dhr_label.presets import names as _classnames

# (name, number of classes, background id) as docs/format.md "Dataset presets" states them.
EXPECTED = [
    ("voc", 21, 0),
    ("coco", 81, 0),
    ("context", 60, 0),
    ("context59", 59, None),
    ("ade", 150, None),
    ("stuff", 171, None),
    ("camvid", 11, None),
]


def test_every_preset_is_covered():
    assert set(PRESET_NAMES) == {name for name, _, _ in EXPECTED}


@pytest.mark.parametrize(("name", "count", "background"), EXPECTED)
def test_counts_and_background(name, count, background):
    preset = PRESETS[name]
    assert preset.name == name
    assert preset.num_classes == count
    assert len(preset.classes) == count
    assert preset.background == background
    if background is not None:
        assert preset.classes[background] == "background"
    else:
        assert "background" not in preset.classes


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_no_duplicate_names(name):
    classes = PRESETS[name].classes
    assert len(set(classes)) == len(classes)
    assert all(c == c.strip() and c for c in classes)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_palette_covers_every_byte_value(name):
    palette = PRESETS[name].palette
    assert len(palette) == 3 * 256
    assert all(0 <= v <= 255 for v in palette)


def test_ade150_ids_follow_object_info150():
    # objectInfo150 ids are 1-based; mask value 0 ("other") is not a class, so id k sits at k - 1.
    ade = PRESETS["ade"].classes
    assert ade[:5] == ("wall", "building", "sky", "floor", "tree")
    assert ade[12] == "person"  # id 13 "person, individual, someone, ..."
    assert ade[89] == "television"  # id 90 "television, television receiver, ..."
    assert ade[136] == "traffic light"  # id 137
    assert ade[-1] == "flag"  # id 150


def test_coco_stuff171_is_things_then_stuff():
    stuff = PRESETS["stuff"].classes
    assert stuff[:80] == _classnames.COCO_THINGS
    assert stuff[0] == "person" and stuff[79] == "toothbrush"
    assert stuff[80:84] == ("banner", "blanket", "branch", "bridge")
    # Official ids 92..182 (stuff) become 80..170: "sky-other" is 157, "wood" 182.
    assert stuff[157 - 92 + 80] == "sky-other"
    assert stuff[-1] == "wood"
    # The 11 thing ids the official 182-id list keeps unused are absent.
    unused = {"street sign", "hat", "shoe", "eye glasses", "plate", "mirror", "window", "desk",
              "door", "blender", "hair brush"}
    assert unused.isdisjoint(stuff)


def test_context_is_background_plus_context59():
    assert PRESETS["context"].classes == ("background",) + PRESETS["context59"].classes


def test_voc_palette_known_colours():
    # Worked out by hand from the bit-interleaving rule: bit 0 of the id feeds red, bit 1 green,
    # bit 2 blue, each at the highest remaining bit of its channel.
    palette = PRESETS["voc"].palette
    first = [tuple(palette[3 * i : 3 * i + 3]) for i in range(5)]
    assert first == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]
    assert PRESETS["voc"].colour(8) == (64, 0, 0)  # 8 = 0b001000: red's second-highest bit
    assert PRESETS["voc"].colour(15) == (192, 128, 128)  # person: 15 = 0b001111
    assert PRESETS["voc"].colour(IGNORE_INDEX) == (224, 224, 192)  # VOC's boundary colour
    assert voc_palette(3) == [0, 0, 0, 128, 0, 0, 0, 128, 0]


def test_camvid_palette():
    camvid = PRESETS["camvid"]
    assert camvid.classes[0] == "Sky"
    assert camvid.colour(0) == (128, 128, 128)
    assert camvid.colour(3) == (128, 64, 128)  # Road
    assert camvid.colour(IGNORE_INDEX) == (0, 0, 0)


@pytest.mark.parametrize("spelling", ["voc", "VOC", "Ade", "stuff"])
def test_resolve_preset_by_name(spelling):
    assert resolve_preset(spelling) is PRESETS[spelling.lower()]


def test_resolve_preset_unknown_name():
    with pytest.raises(DHRLabelError) as info:
        resolve_preset("pascal")
    message = str(info.value)
    assert "'pascal'" in message
    assert all(name in message for name in PRESET_NAMES)


def test_resolve_preset_from_class_file(tmp_path):
    path = tmp_path / "roads.txt"
    path.write_text("# my dataset\nBackground\n\nroad\n  car  \n", encoding="utf-8")
    for spec in (path, str(path)):
        preset = resolve_preset(spec)
        assert preset.name == "roads"
        assert preset.classes == ("Background", "road", "car")
        assert preset.background == 0
        assert preset.palette == tuple(voc_palette())


def test_class_file_without_background(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("cat\ndog\n", encoding="utf-8")
    preset = load_class_file(path)
    assert preset.classes == ("cat", "dog")
    assert preset.background is None


def test_class_file_background_not_first(tmp_path):
    path = tmp_path / "late.txt"
    path.write_text("cat\ndog\nbackground\n", encoding="utf-8")
    assert load_class_file(path).background == 2


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   \n"])
def test_class_file_empty(tmp_path, text):
    path = tmp_path / "empty.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DHRLabelError, match=re.escape(f"class-list file {path}: expected one class "
                                                      "name a line, found none")):
        load_class_file(path)


def test_class_file_duplicates(tmp_path):
    path = tmp_path / "dup.txt"
    path.write_text("cat\ndog\ncat\nbird\ndog\n", encoding="utf-8")
    with pytest.raises(DHRLabelError) as info:
        load_class_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "duplicated class names ['cat', 'dog']" in message


def test_class_file_too_many_classes(tmp_path):
    path = tmp_path / "many.txt"
    path.write_text("".join(f"c{i}\n" for i in range(256)), encoding="utf-8")
    with pytest.raises(DHRLabelError) as info:
        load_class_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "at most 255 classes" in message
    assert "found 256" in message


def test_class_file_255_classes_fit(tmp_path):
    # Ids 0..254 are classes; 255 stays the ignore value.
    path = tmp_path / "max.txt"
    path.write_text("".join(f"c{i}\n" for i in range(255)), encoding="utf-8")
    preset = load_class_file(path)
    assert preset.num_classes == 255
    assert preset.classes[-1] == "c254"


def test_class_file_missing(tmp_path):
    path = tmp_path / "absent.txt"
    with pytest.raises(DHRLabelError, match=re.escape(f"cannot read class-list file {path}")):
        load_class_file(path)
    # A path that does not exist is not a preset name either.
    with pytest.raises(DHRLabelError, match="unknown dataset preset"):
        resolve_preset(path)


def test_check_agreement_accepts_matching_file():
    voc = PRESETS["voc"]
    assert check_agreement(voc, list(_classnames.VOC), 0, "cams.h5") is None


def test_check_agreement_names_both_sides_of_a_renamed_class():
    classes = list(_classnames.VOC)
    classes[8] = "kitten"  # "cat" in VOC
    with pytest.raises(DHRLabelError) as info:
        check_agreement(PRESETS["voc"], classes, 0, "run/cams.h5")
    message = str(info.value)
    assert message.startswith("run/cams.h5: ")
    assert "preset 'voc'" in message
    assert "expected 21 classes, found 21" in message
    assert "first difference at id 8 (preset 'cat', file 'kitten')" in message


def test_check_agreement_names_both_counts_of_a_shorter_list():
    classes = list(_classnames.VOC[:20])
    with pytest.raises(DHRLabelError) as info:
        check_agreement(PRESETS["voc"], classes, 0, "cams.h5")
    message = str(info.value)
    assert "expected 21 classes, found 20" in message
    assert "first difference at id 20 (preset 'tvmonitor', file '<none>')" in message


def test_check_agreement_background_mismatch():
    with pytest.raises(DHRLabelError) as info:
        check_agreement(PRESETS["voc"], list(_classnames.VOC), None, "cams.h5")
    assert str(info.value) == "cams.h5: background id -1 in the file, 0 in preset 'voc'"


def test_preset_from_classes_finds_known_preset():
    assert preset_from_classes(list(_classnames.CAMVID), None) is PRESETS["camvid"]
    custom = preset_from_classes(["sky", "road"], None, name="cams.h5")
    assert custom.name == "cams.h5"
    assert custom.classes == ("sky", "road")
    assert custom.background is None


def test_classes_json_round_trips():
    assert json.loads(classes_json(PRESETS["ade"])) == list(_classnames.ADE150)
