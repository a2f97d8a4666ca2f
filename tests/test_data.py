"""Training data: box-exact transforms, synthetic data, the validating JSONL loader, collate."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gill.data.collate import build_dataset, collate_layout
from gill.data.layout import LayoutDataset
from gill.data.synthetic import SyntheticLayoutDataset, make_caption, write_jsonl
from gill.data.transforms import LayoutTransform, crop, hflip, resize_shorter
from gill.data.vocab import BACKGROUNDS, COLORS

approx = lambda v: pytest.approx(v, abs=1e-9)  # noqa: E731


def boxes_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert tuple(g) == approx(tuple(w))


# ------------------------------------------------------------------ transforms
def test_resize_shorter_keeps_aspect_and_boxes():
    boxes = [(0.1, 0.2, 0.5, 0.6)]
    img, out = resize_shorter(Image.new("RGB", (200, 100)), boxes, 50)
    assert img.size == (100, 50) and out == boxes
    img, out = resize_shorter(Image.new("RGB", (100, 300)), boxes, 50)
    assert img.size == (50, 150) and out == boxes
    img, _ = resize_shorter(Image.new("RGB", (30, 20)), boxes, 40)  # upscales too
    assert img.size == (60, 40)


def test_crop_renormalizes_clips_and_drops():
    img = Image.new("RGB", (100, 100), (0, 0, 0))
    img.putpixel((10, 30), (255, 0, 0))  # marks the inside box's top-left pixel
    boxes = [
        (0.10, 0.30, 0.30, 0.50),  # inside: px x 10-30, y 30-50
        (0.40, 0.20, 0.80, 0.40),  # cut by the right and top edges
        (0.70, 0.80, 0.90, 0.95),  # fully outside -> dropped
        (0.59, 0.40, 0.90, 0.60),  # clipped to a 1-px sliver (x 59-60) -> dropped
    ]
    out_img, out, kept = crop(img, boxes, top=25, left=10, h=50, w=50)  # window x 10-60, y 25-75
    assert out_img.size == (50, 50)
    assert out_img.getpixel((0, 5)) == (255, 0, 0)
    assert kept == [0, 1]
    boxes_equal(out, [(0.0, 0.1, 0.4, 0.5), (0.6, 0.0, 1.0, 0.3)])


def test_crop_min_area_drop():
    _, out, kept = crop(Image.new("RGB", (100, 100)), [(0.0, 0.0, 0.03, 0.03)], 0, 0, 100, 100, min_area=0.001)
    assert out == [] and kept == []


def test_hflip_mirrors_boxes_and_pixels():
    img = Image.new("RGB", (10, 4), (0, 0, 0))
    img.putpixel((1, 2), (9, 9, 9))
    out_img, out = hflip(img, [(0.1, 0.2, 0.4, 0.5), (0.0, 0.0, 1.0, 1.0)])
    assert out_img.getpixel((8, 2)) == (9, 9, 9)
    boxes_equal(out, [(0.6, 0.2, 0.9, 0.5), (0.0, 0.0, 1.0, 1.0)])


OBJS = [{"label": "猫", "bbox": (0.1, 0.2, 0.5, 0.6)}, {"label": "狗", "bbox": (0.8, 0.1, 0.95, 0.3)}]


def test_layout_transform_center_crop_no_flip():
    # 200x100 -> resized 100x50 -> centre crop 50x50 at left = 25
    img, objs, tl = LayoutTransform(50, center_crop=True, random_flip=0.0)(
        Image.new("RGB", (200, 100)), OBJS, np.random.default_rng(0))
    assert img.size == (50, 50) and tl == (0, 25)
    assert [o["label"] for o in objs] == ["猫"]  # the dog (px 80-95) lies right of the crop
    boxes_equal([o["bbox"] for o in objs], [(0.0, 0.2, 0.5, 0.6)])


def test_layout_transform_center_crop_with_flip():
    img, objs, tl = LayoutTransform(50, center_crop=True, random_flip=1.0)(
        Image.new("RGB", (200, 100)), OBJS, np.random.default_rng(0))
    assert tl == (0, 25)
    # flipped: cat px 50-90 -> (25..75 window) 0.5-1.0; dog px 5-20 -> dropped
    assert [o["label"] for o in objs] == ["猫"]
    boxes_equal([o["bbox"] for o in objs], [(0.5, 0.2, 1.0, 0.6)])


def test_layout_transform_random_crop_is_seeded_and_consistent():
    t = LayoutTransform(50, center_crop=False, random_flip=0.0)
    src = Image.new("RGB", (400, 100))
    a = t(src, OBJS, np.random.default_rng(7))
    b = t(src, OBJS, np.random.default_rng(7))
    assert a[2] == b[2] and a[1] == b[1]
    offsets = {t(src, OBJS, np.random.default_rng(s))[2] for s in range(20)}
    assert len(offsets) > 1 and all(top == 0 and 0 <= left <= 150 for top, left in offsets)
    # the reported offset is the one the boxes were cropped with
    for s in range(20):
        _, objs, (top, left) = t(src, [OBJS[0]], np.random.default_rng(s))
        x1, x2 = 0.1 * 200, 0.5 * 200  # px in the 200x50 resized image
        cx1, cx2 = max(x1 - left, 0) / 50, min(x2 - left, 50) / 50
        if cx2 - cx1 >= 2 / 50:
            boxes_equal([objs[0]["bbox"]], [(cx1, 0.2, cx2, 0.6)])
        else:
            assert objs == []


# ------------------------------------------------------------------ synthetic
def test_synthetic_is_deterministic_by_index():
    a, b = SyntheticLayoutDataset(20, seed=3), SyntheticLayoutDataset(20, seed=3)
    _ = [b[i] for i in reversed(range(20))]  # access order must not matter
    for i in (0, 7, 19):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and x["objects"] == y["objects"] and x["id"] == y["id"]
        assert x["image"].tobytes() == y["image"].tobytes()
    val = SyntheticLayoutDataset(20, seed=3, split="val")
    assert [val[i]["caption"] for i in range(20)] != [a[i]["caption"] for i in range(20)]
    assert val[0]["id"] != a[0]["id"]


def test_synthetic_pixels_fill_their_boxes():
    ds = SyntheticLayoutDataset(40, resolution=64, seed=1, min_objects=1, max_objects=3)
    counts = set()
    for i in range(len(ds)):
        item = ds[i]
        img = np.asarray(item["image"])
        assert item["image"].mode == "RGB" and img.shape == (64, 64, 3)
        assert item["original_size"] == (64, 64) and item["crop_top_left"] == (0, 0)
        objs = item["objects"]
        counts.add(len(objs))
        areas = [(o["bbox"][2] - o["bbox"][0]) * (o["bbox"][3] - o["bbox"][1]) for o in objs]
        assert areas == sorted(areas, reverse=True)
        bg_name = item["caption"].split("背景")[0]
        covered = np.zeros((64, 64), bool)
        for o in objs:
            x1, y1, x2, y2 = (round(v * 64) for v in o["bbox"])
            assert tuple(v * 64 for v in o["bbox"]) == approx((x1, y1, x2, y2))
            color = COLORS[o["label"][:2]]
            region = np.all(img[y1:y2, x1:x2] == color, axis=-1)
            ys, xs = np.nonzero(region)
            # the shape touches all four sides of its box: it fills it
            assert (ys.min(), ys.max(), xs.min(), xs.max()) == (0, y2 - y1 - 1, 0, x2 - x1 - 1), o
            assert region[(y2 - y1) // 2, (x2 - x1) // 2]  # and covers its centre
            assert not covered[y1:y2, x1:x2].any()  # boxes do not overlap
            covered[y1:y2, x1:x2] = True
        # outside every box there is only background
        assert np.all(img[~covered] == BACKGROUNDS[bg_name])
        # the caption names the objects left to right (by box centre), then top to bottom
        in_reading_order = sorted(objs, key=lambda o: (o["bbox"][0] + o["bbox"][2], o["bbox"][1] + o["bbox"][3]))
        assert item["caption"] == make_caption(bg_name, [o["label"] for o in in_reading_order])
    assert counts == {1, 2, 3}


def test_caption_format():
    assert make_caption("白色", ["红色圆形"]) == "白色背景上有一个红色圆形"
    assert make_caption("白色", ["红色圆形", "蓝色正方形"]) == "白色背景上有一个红色圆形和一个蓝色正方形"
    assert make_caption("灰色", ["a", "b", "c"]) == "灰色背景上有一个a、一个b和一个c"


def test_write_jsonl_roundtrips_through_layout_dataset(tmp_path):
    syn = SyntheticLayoutDataset(4, resolution=64, seed=5)
    path = write_jsonl(syn, tmp_path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4 and "背景" in lines[0]  # Chinese unescaped
    ds = LayoutDataset(path, tmp_path, resolution=64, random_flip=0.0)
    assert len(ds) == 4 and not ds.skipped
    for i in range(4):
        a, b = syn[i], ds[i]
        assert a["id"] == b["id"] and a["caption"] == b["caption"]
        assert [o["label"] for o in a["objects"]] == [o["label"] for o in b["objects"]]
        boxes_equal([o["bbox"] for o in b["objects"]], [o["bbox"] for o in a["objects"]])
        assert a["image"].tobytes() == b["image"].tobytes()
        assert b["original_size"] == (64, 64) and b["crop_top_left"] == (0, 0)


# ------------------------------------------------------------------ layout loader
def _png(path, size=(80, 60), color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _rec(id_, image="images/a.png", **kw):
    rec = {"id": id_, "image": image, "caption": "一只猫", "width": 80, "height": 60,
           "objects": [{"label": "猫", "bbox": [0.1, 0.1, 0.5, 0.5]}]}
    rec.update(kw)
    return json.dumps(rec, ensure_ascii=False)


@pytest.fixture
def root(tmp_path):
    data = tmp_path / "data"
    _png(data / "images" / "a.png")
    _png(tmp_path / "outside.png")
    return data


def _write(root, lines):
    path = root / "layout.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_loader_skips_each_bad_record_with_its_reason(root, caplog):
    os.symlink(root.parent / "outside.png", root / "images" / "link.png")
    no_caption = json.loads(_rec("r4"))
    del no_caption["caption"]
    lines = [
        _rec("good1"),                                              # 1
        '{"id": "broken", "image": ',                               # 2
        "[1, 2, 3]",                                                # 3
        json.dumps(no_caption),                                     # 4
        _rec("r5", width="80"),                                     # 5
        _rec("r6", height=0),                                       # 6
        _rec("r7", image="../outside.png"),                         # 7
        _rec("r8", image=str(root / "images" / "a.png")),           # 8
        _rec("r9", image="images/link.png"),                        # 9
        _rec("r10", image="images/missing.png"),                    # 10
        _rec("good1"),                                              # 11 duplicate
        _rec("r12", bbox_unit="inch"),                              # 12
        _rec("r13", caption="  "),                                  # 13
        _rec("r14", objects={"label": "猫"}),                       # 14
        _rec(15),                                                   # 15
        _rec("r16", width=True),                                    # 16
        "",                                                         # 17 blank: not a record
        _rec("r18", image="images/../images/a.png"),                # 18 stays inside: fine
    ]
    with caplog.at_level(logging.WARNING, logger="gill.data.layout"):
        ds = LayoutDataset(_write(root, lines), root, resolution=32)
    expected = {
        2: "invalid_json", 3: "not_an_object", 4: "missing_field:caption", 5: "wrong_type:width",
        6: "bad_size:height", 7: "image_path_escapes_root", 8: "absolute_image_path",
        9: "image_path_escapes_root", 10: "missing_image", 11: "duplicate_id", 12: "bad_bbox_unit",
        13: "empty_caption", 14: "wrong_type:objects", 15: "wrong_type:id", 16: "wrong_type:width",
    }
    assert {ln: reason for ln, _, reason in ds.skipped_records} == expected
    assert sum(ds.skipped.values()) == len(expected) and ds.skipped["image_path_escapes_root"] == 2
    assert ("r7" in [i for _, i, _ in ds.skipped_records]) and (2, None, "invalid_json") in ds.skipped_records
    assert [r["id"] for r in ds.records] == ["good1", "r18"]
    # one warning per skipped record, naming its reason
    skip_logs = [r.getMessage() for r in caplog.records if "skipped record" in r.getMessage()]
    assert len(skip_logs) == len(expected)
    assert any(":7 " in m and "image_path_escapes_root" in m for m in skip_logs)


def test_loader_drops_bad_objects_and_keeps_the_record(root, caplog):
    objects = [
        {"label": "小", "bbox": [0.1, 0.1, 0.2, 0.2]},
        {"label": "像素", "bbox": [10, 20, 300, 400]},      # pixels declared norm
        {"label": "反", "bbox": [0.5, 0.1, 0.2, 0.6]},      # inverted
        {"label": "非数", "bbox": [0.1, float("nan"), 0.2, 0.3]},
        {"bbox": [0.1, 0.1, 0.3, 0.3]},                      # no label
        {"label": "无框"},
        "猫",
        {"label": "大", "bbox": [0.0, 0.0, 0.9, 0.8]},
    ]
    lines = [_rec("r1", objects=objects),
             _rec("r2", objects=[{"label": "猫", "bbox": [100, 100, 500, 500]}], bbox_unit="1000"),
             _rec("r3", objects=[{"label": "坏", "bbox": [0, 0, 0, 0]}])]
    with caplog.at_level(logging.WARNING, logger="gill.data.layout"):
        ds = LayoutDataset(_write(root, lines), root, resolution=32)
    assert not ds.skipped and len(ds) == 3
    assert ds.dropped_objects == {"bad_bbox": 4, "bad_label": 1, "missing_bbox": 1, "object_not_a_dict": 1}
    assert [o["label"] for o in ds.records[0]["objects"]] == ["大", "小"]  # largest first
    assert ds.records[1]["objects"][0]["bbox"] == approx((0.1, 0.1, 0.5, 0.5))
    assert ds.records[2]["objects"] == []
    assert sum("dropped objects" in r.getMessage() for r in caplog.records) == 2  # once per record


def test_loader_dataset_wide_pixel_unit_and_max_objects(root):
    objects = [{"label": f"o{i}", "bbox": [8 * i, 6 * i, 8 * i + 8 + i, 6 * i + 6]} for i in range(5)]
    path = _write(root, [_rec("r1", objects=objects)])
    ds = LayoutDataset(path, root, resolution=60, bbox_unit="pixel", max_objects=3, random_flip=0.0)
    rec = ds.records[0]["objects"]
    assert [o["label"] for o in rec] == ["o4", "o3", "o2", "o1", "o0"]
    assert rec[0]["bbox"] == approx((32 / 80, 24 / 60, 44 / 80, 30 / 60))
    item = ds[0]  # 80x60 -> 80x60 (shorter = 60) -> centre crop left 10
    assert item["original_size"] == (60, 80) and item["crop_top_left"] == (0, 10)
    assert [o["label"] for o in item["objects"]] == ["o4", "o3", "o2"]
    assert item["objects"][0]["bbox"] == approx((22 / 60, 24 / 60, 34 / 60, 30 / 60))
    with pytest.raises(ValueError):
        LayoutDataset(path, root, resolution=60, bbox_unit="inch")


def test_corrupt_image_falls_through_to_next_item(root, caplog):
    (root / "images" / "garbage.png").write_bytes(b"this is not a png")
    _png(root / "images" / "full.png")
    data = (root / "images" / "full.png").read_bytes()
    (root / "images" / "trunc.png").write_bytes(data[: len(data) // 2])
    _png(root / "images" / "b.png", color=(0, 0, 255))
    lines = [_rec("ok0"), _rec("garbage", image="images/garbage.png"), _rec("ok2", image="images/b.png"),
             _rec("trunc", image="images/trunc.png")]
    ds = LayoutDataset(_write(root, lines), root, resolution=32)
    assert len(ds) == 4 and not ds.skipped  # decoding is only tried when the item is read
    with caplog.at_level(logging.WARNING, logger="gill.data.layout"):
        assert ds[1]["id"] == "ok2"
        assert ds[1]["id"] == "ok2"  # same answer again, and logged only once
        assert ds[3]["id"] == "ok0"  # wraps around
    assert ds.skipped == {"undecodable_image": 2}
    assert sum("cannot decode" in r.getMessage() for r in caplog.records) == 2
    assert ds[2]["image"].getpixel((0, 0)) == (0, 0, 255)


def test_epoch_and_index_seed_the_random_crop(root):
    _png(root / "images" / "wide.png", size=(256, 64))
    path = _write(root, [_rec("w", image="images/wide.png", width=256, height=64)])
    ds = LayoutDataset(path, root, resolution=32, center_crop=False, random_flip=0.5, seed=1)
    first = ds[0]["crop_top_left"]
    assert ds[0]["crop_top_left"] == first
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        seen.add(ds[0]["crop_top_left"])
    assert len(seen) > 1
    ds.set_epoch(0)
    assert ds[0]["crop_top_left"] == first


# ------------------------------------------------------------------ collate + factory
def test_collate_shapes_and_padding():
    syn = SyntheticLayoutDataset(10, resolution=32, seed=2, min_objects=1, max_objects=3)
    items = [syn[i] for i in range(6)]
    batch = collate_layout(items)
    n = max(len(it["objects"]) for it in items)
    assert batch["boxes"].shape == (6, n, 4) and batch["boxes"].dtype == torch.float32
    assert batch["box_mask"].shape == (6, n) and batch["box_mask"].dtype == torch.bool
    assert batch["box_mask"].sum(1).tolist() == [len(it["objects"]) for it in items]
    assert torch.all(batch["boxes"][~batch["box_mask"]] == 0)
    assert batch["boxes"][0, 0].tolist() == approx(list(items[0]["objects"][0]["bbox"]))
    assert batch["original_size"].dtype == torch.long and batch["original_size"].tolist() == [[32, 32]] * 6
    assert batch["crop_top_left"].shape == (6, 2)
    assert batch["labels"] == [[o["label"] for o in it["objects"]] for it in items]
    assert batch["ids"] == [it["id"] for it in items] and len(batch["images"]) == 6
    empty = collate_layout([{**items[0], "objects": []}])
    assert empty["boxes"].shape == (1, 1, 4) and not empty["box_mask"].any()


def test_build_dataset(root):
    syn = build_dataset({"name": "synthetic", "num_samples": 5, "seed": 4, "min_objects": 2,
                         "max_objects": 2}, resolution=32, seed=0)
    assert isinstance(syn, SyntheticLayoutDataset) and len(syn) == 5 and syn.seed == 4
    assert syn[0]["image"].size == (32, 32)
    path = _write(root, [_rec("a")])
    lay = build_dataset({"name": "layout", "path": str(path), "image_root": str(root), "center_crop": False,
                         "random_flip": 0.0, "max_objects": 5}, resolution=32, seed=9)
    assert isinstance(lay, LayoutDataset) and lay.seed == 9 and lay[0]["image"].size == (32, 32)
    lay2 = build_dataset({"name": "layout", "path": str(path)}, resolution=32, seed=0)  # root = JSONL dir
    assert len(lay2) == 1
    with pytest.raises(ValueError):
        build_dataset({"name": "webdataset"}, 32, 0)


def test_non_utf8_lines_are_rejected_and_bom_accepted(root):
    path = root / "layout.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _rec("bom").encode("utf-8") + b"\n"
                     + _rec("gbk", caption="一只狗").encode("gbk") + b"\n"
                     + _rec("latin", caption="café", objects=[{"label": "café", "bbox": [0.1, 0.1, 0.5, 0.5]}]).encode("latin-1") + b"\n"
                     + _rec("replaced", caption="一只\ufffd猫").encode("utf-8") + b"\n")
    ds = LayoutDataset(path, root, resolution=32)
    assert [r["id"] for r in ds.records] == ["bom"]
    assert ds.skipped == {"bad_encoding": 3}
    assert [ln for ln, _, _ in ds.skipped_records] == [2, 3, 4]


def test_implausible_units_and_size_mismatch_and_empty_records(root, caplog):
    _png(root / "images" / "big.png", size=(200, 60))
    lines = [
        _rec("norm_as_1000", bbox_unit="1000"),                       # every coordinate <= 1
        _rec("norm_as_pixel", bbox_unit="pixel"),
        _rec("ok_1000", bbox_unit="1000", objects=[{"label": "猫", "bbox": [100, 100, 500, 500]}]),
        _rec("wrong_size", image="images/big.png"),                   # declares 80x60
        _rec("no_objects", objects=[]),
    ]
    ds = LayoutDataset(_write(root, lines), root, resolution=32, random_flip=0.0)
    assert ds.skipped == {"implausible_bbox_unit": 2}
    assert ds.notices == {"records_without_objects": 1}
    with caplog.at_level(logging.WARNING, logger="gill.data.layout"):
        assert ds[1]["id"] == "no_objects"  # wrong_size is replaced by the next item
    assert ds.skipped["size_mismatch"] == 1
    assert any("200x60" in r.getMessage() and "80x60" in r.getMessage() for r in caplog.records)


def test_boxes_cropped_away_are_counted(root, caplog):
    _png(root / "images" / "wide.png", size=(300, 60))
    objects = [{"label": "左", "bbox": [0.0, 0.1, 0.05, 0.9]}, {"label": "中", "bbox": [0.4, 0.1, 0.6, 0.9]}]
    lines = [_rec("edge", image="images/wide.png", width=300, height=60, objects=objects[:1]),
             _rec("both", image="images/wide.png", width=300, height=60, objects=objects)]
    ds = LayoutDataset(_write(root, lines), root, resolution=32, random_flip=0.0)  # centre crop keeps the middle
    with caplog.at_level(logging.WARNING, logger="gill.data.layout"):
        assert ds[0]["objects"] == [] and len(ds[1]["objects"]) == 1
        ds[0]
    assert ds.dropped_objects == {"cropped_out": 3}
    assert ds.notices["all_objects_cropped_out"] == 2
    assert sum("shrink to nothing" in r.getMessage() for r in caplog.records) == 2  # once per record


def test_layout_config_holds_out_a_validation_split(root):
    from hydra import compose, initialize_config_dir

    _png(root / "images" / "a.png")
    path = _write(root, [_rec(f"r{i}") for i in range(200)])
    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        cfg = compose("config", overrides=["data=layout", f"data.path={path}", "data.val_fraction=0.1"])
        other = compose("config", overrides=["data=layout", f"data.path={path}", f"data.val.path={path}.val"])
    train = build_dataset(cfg.data, 32, 0)
    val = build_dataset(cfg.data.val, 32, 0)
    ids_train, ids_val = {r["id"] for r in train.records}, {r["id"] for r in val.records}
    assert not ids_train & ids_val and len(ids_train | ids_val) == 200
    assert 8 <= len(ids_val) <= 40 and val.transform.random_flip == 0.0
    # deterministic, and a record keeps its side when the file grows
    path2 = _write(root, [_rec(f"r{i}") for i in range(300)])
    assert path2 == path
    assert ids_val <= {r["id"] for r in build_dataset(cfg.data.val, 32, 0).records}
    # validation from another file: training keeps every record
    (root / "layout.jsonl.val").write_text(_rec("v0") + "\n", encoding="utf-8")
    assert len(build_dataset(other.data, 32, 0)) == 300
    assert [r["id"] for r in build_dataset(other.data.val, 32, 0).records] == ["v0"]


def test_check_cli_reports_each_reason_and_fails(root):
    import subprocess
    import sys

    from gill.data.check import check, record_schema

    assert record_schema()["required"] == ["id", "image", "caption", "width", "height", "objects"]
    good = [_rec("g1"), _rec("g2", objects=[{"label": "猫", "bbox": [100, 100, 500, 500]}], bbox_unit="1000")]
    path = _write(root, good)
    repo = os.path.join(os.path.dirname(__file__), "..")
    cmd = [sys.executable, "-m", "gill.data.check", f"data.path={path}", f"data.image_root={root}"]
    ok = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr

    _png(root / "images" / "big.png", size=(90, 60))
    path = _write(root, good + [
        _rec("extra_key", annotator="qwen"),                          # schema: annotator must be an object
        _rec("miss", image="images/missing.png"),
        _rec("size", image="images/big.png"),                         # declares 80x60
        _rec("unit", bbox_unit="pixel"),                              # all coordinates <= 1 in pixels
        _rec("badbox", objects=[{"label": "猫", "bbox": [0.5, 0.1, 0.2, 0.6]}]),
    ])
    with open(path, "ab") as f:
        f.write(_rec("gbk", caption="一只狗").encode("gbk") + b"\n")
    report = check(path, root)
    assert not report["ok"] and report["records"] == 8 and report["bad_records"] == 5
    assert report["bad_by_reason"] == {"bad_encoding": 1, "implausible_bbox_unit": 1, "missing_image": 1,
                                       "schema:annotator:type": 1, "size_mismatch": 1}
    assert report["dropped_objects"] == {"bad_bbox": 1}
    bad = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    assert bad.returncode == 1 and "size_mismatch: 1" in bad.stdout and "FAILED" in bad.stdout
    (root / "empty.jsonl").write_text("\n", encoding="utf-8")
    assert not check(root / "empty.jsonl", root)["ok"]  # an empty file is no data set
