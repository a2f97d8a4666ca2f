"""End-to-end tests of the annotation pipeline on a tiny Qwen2-VL built locally (no downloads).

The model's generations are forced per id (``backend.forced_outputs``) so the boxes are known; everything
else — tokenizer, image processor, vision tower, batched generate with left padding, decoding with special
tokens, parsing, filtering, writing — is the real path.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gill.annotate.filters import FilterConfig, apply_filters, label_relates
from gill.annotate.sources import resolve_inside, smart_resize
from gill.data.grounding import GroundedObject

REPO = Path(__file__).resolve().parents[1]
R, E, B, F = "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"
N_GOOD = 20


def _compose(**over):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("annotate", overrides=[f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 synthetic images with known boxes, plus one row for each failure kind."""
    from gill.annotate.tiny_qwen import build_tiny_qwen2vl

    root = tmp_path_factory.mktemp("annot")
    model = build_tiny_qwen2vl(root / "tiny-qwen2vl")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, forced, expected = ["image\tcaption"], {}, {}
    for i in range(N_GOOD):
        w, h = int(rng.integers(80, 300)), int(rng.integers(80, 300))
        im = Image.new("RGB", (w, h), (200, 200, 200))
        a = [int(v) for v in sorted(rng.integers(0, 450, 2))] + [int(v) for v in sorted(rng.integers(550, 1000, 2))]
        box1 = (a[0], a[1], a[2], a[3])  # x1 < 450 < 550 < x2: never small, never whole-image
        box2 = (600, 50, 950, 400)
        im.paste((255, 0, 0), (box1[0] * w // 1000, box1[1] * h // 1000, box1[2] * w // 1000, box1[3] * h // 1000))
        name = f"sub/{i:03d}.jpg" if i % 2 else f"{i:03d}.png"
        im.save(images / name)
        rows.append(f"{name}\t一个红色的方块和一只橘猫，第{i}张")
        text = f"{R}方块{E}{B}({box1[0]},{box1[1]}),({box1[2]},{box1[3]}){F}{R}橘猫{E}{B}({box2[0]},{box2[1]}),({box2[2]},{box2[3]}){F}"
        if i == 3:  # a label the caption does not mention, and a same-label duplicate: both filtered
            text += f"{R}飞机{E}{B}(0,0),(500,500){F}{R}橘猫{E}{B}(601,51),(950,400){F}"
        forced[f"img_{i:08d}"] = text
        expected[f"img_{i:08d}"] = {("方块", tuple(v / 1000 for v in box1)), ("橘猫", tuple(v / 1000 for v in box2))}
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    Image.new("RGB", (600, 2)).save(images / "thin.png")  # 300:1
    Image.new("RGB", (64, 64)).save(images / "garbage.png")
    rows += ["corrupt.jpg\t一只坏掉的猫", "nope/missing.jpg\t一只不存在的猫", "a.jpg\tcaption\textra field",
             "thin.png\t一条细线", "../../etc/passwd\t逃出去的猫", "garbage.png\t一只猫"]
    forced[f"img_{N_GOOD + 5:08d}"] = "I cannot find anything."  # garbage output
    (root / "pairs.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "forced.json").write_text(json.dumps(forced, ensure_ascii=False), encoding="utf-8")
    return {"root": root, "model": model, "images": images, "expected": expected}


def _cfg(data, out, **over):
    base = {"source.path": data["root"] / "pairs.tsv", "source.image_root": data["images"],
            "output.path": out, "backend.model_path": data["model"], "backend.model_name": "tiny-qwen2vl",
            "backend.forced_outputs": data["root"] / "forced.json", "batch_size": 4, "progress": False}
    base.update(over)
    return _compose(**base)


def _lines(path):
    return Path(path).read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def single_run(data):
    from gill.annotate import run_annotation

    out = data["root"] / "single" / "layout.jsonl"
    summary = run_annotation(_cfg(data, out), print_summary=False)
    return out, summary


def test_end_to_end_records_and_loader(data, single_run):
    from gill.data.layout import LayoutDataset

    out, summary = single_run
    recs = [json.loads(line) for line in _lines(out)]
    assert len(recs) == N_GOOD == summary["written"]
    for rec in recs:
        assert rec["annotator"] == {"model": "tiny-qwen2vl", "prompt": "qwen2vl/v1", "backend": "qwen2vl"}
        with Image.open(data["images"] / rec["image"]) as im:
            assert (rec["width"], rec["height"]) == im.size  # the original size, not the model's input
        got = {(o["label"], tuple(o["bbox"])) for o in rec["objects"]}
        assert got == data["expected"][rec["id"]]
    assert "橘猫" in out.read_text(encoding="utf-8")  # ensure_ascii=False
    ds = LayoutDataset(out, data["images"], resolution=64, random_flip=0.0)
    assert len(ds) == N_GOOD and not ds.skipped and not ds.dropped_objects
    for r in ds.records:
        got = {(o["label"], tuple(round(v, 4) for v in o["bbox"])) for o in r["objects"]}
        assert got == data["expected"][r["id"]]
    assert ds[0]["objects"]


def test_failures_go_to_errors_file(data, single_run):
    out, summary = single_run
    errs = {json.loads(line)["image"] or json.loads(line)["id"]: json.loads(line) for line in
            _lines(out.with_name("layout.errors.jsonl"))}
    reasons = {k: v["reason"] for k, v in errs.items()}
    assert reasons == {"corrupt.jpg": "unreadable_image", "nope/missing.jpg": "missing_file",
                       f"img_{N_GOOD + 2:08d}": "malformed_row", "thin.png": "aspect_ratio",
                       f"img_{N_GOOD + 4:08d}": "bad_path", "garbage.png": "no_boxes_parsed"}
    assert errs["garbage.png"]["raw"] == "I cannot find anything."
    assert summary["errors"] == 6 and summary["errors_by_reason"]["aspect_ratio"] == 1
    assert summary["filters"]["label_unrelated"] == 1 and summary["filters"]["duplicate_merged"] == 1
    assert summary["images_per_s"] > 0
    assert json.loads(out.with_name("layout.summary.json").read_text())["written"] == N_GOOD


def test_resume_skips_done_ids(data, single_run):
    from gill.annotate import run_annotation

    out, _ = single_run
    before = out.read_bytes()
    summary = run_annotation(_cfg(data, out), print_summary=False)
    assert summary["processed"] == 0 and summary["skipped_done"] == N_GOOD + 6
    assert out.read_bytes() == before


@pytest.mark.slow
def test_killed_half_way_then_rerun_equals_uninterrupted(data, single_run):
    out = data["root"] / "killed" / "layout.jsonl"
    args = [f"source.path={data['root'] / 'pairs.tsv'}", f"source.image_root={data['images']}",
            f"output.path={out}", f"backend.model_path={data['model']}", "backend.model_name=tiny-qwen2vl",
            f"backend.forced_outputs={data['root'] / 'forced.json'}", "batch_size=4", "progress=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "gill.annotate", *args]
    crashed = subprocess.run(cmd + ["debug.crash_after_batches=2"], cwd=REPO, env=env, capture_output=True, text=True)
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    partial = out.read_text(encoding="utf-8")
    assert partial and not partial.endswith("\n")  # died mid-line
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "annotation summary" in done.stdout
    ref, _ = single_run
    assert out.read_text(encoding="utf-8") == ref.read_text(encoding="utf-8")
    assert (out.with_name("layout.errors.jsonl").read_text(encoding="utf-8")
            == ref.with_name("layout.errors.jsonl").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_ray_two_actors_matches_single_process(data, single_run):
    ray = pytest.importorskip("ray")
    from gill.annotate import run_annotation

    out = data["root"] / "ray" / "layout.jsonl"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_annotation(_cfg(data, out, **{
            "ray.enabled": "true", "ray.num_actors": 2, "ray.num_gpus_per_actor": 0,
            "ray.num_cpus_per_actor": 0.5, "ray.num_cpus_per_task": 0.5}), print_summary=False)
    finally:
        ray.shutdown()
    assert summary["ray"] and summary["written"] == N_GOOD
    ref, _ = single_run
    for name in ("layout.jsonl", "layout.errors.jsonl"):
        assert sorted(_lines(out.with_name(name))) == sorted(_lines(ref.with_name(name)))


# ---------------------------------------------------------------------------- units

def test_filters_each_rule_counted():
    from collections import Counter

    objs = [GroundedObject("猫", (0.1, 0.1, 0.5, 0.5)), GroundedObject("猫", (0.11, 0.1, 0.5, 0.5)),
            GroundedObject("狗", (0.1, 0.1, 0.5, 0.5)), GroundedObject("沙发", (0.0, 0.0, 1.0, 0.99)),
            GroundedObject("沙发", (0.1, 0.1, 0.105, 0.5)), GroundedObject("沙发", (0.5, 0.5, 0.9, 0.9)),
            GroundedObject("猫", (0.6, 0.6, 0.9, 0.9))]
    counts = Counter()
    kept = apply_filters(objs, "一只橘猫趴在沙发上", FilterConfig(max_objects=2), counts)
    assert [o.bbox for o in kept] == [(0.1, 0.1, 0.5, 0.5), (0.5, 0.5, 0.9, 0.9)]
    assert counts == {"duplicate_merged": 1, "label_unrelated": 1, "box_whole_image": 1, "box_too_small": 1,
                      "over_max_objects": 1}


@pytest.mark.parametrize("label,caption,ok", [
    ("橘猫", "一只橘猫趴在沙发上", True), ("猫咪", "一只橘猫趴在沙发上", True), ("飞机", "一只橘猫趴在沙发上", False),
    ("red cup", "A Red Cup on a table", True), ("cups", "a cup on a table", True), ("dog", "a cup", False),
])
def test_label_relates(label, caption, ok):
    assert label_relates(label, caption) is ok


def test_paths_cannot_escape_root(tmp_path):
    assert resolve_inside(tmp_path, "a/./b.jpg")[0] == "a/b.jpg"
    for bad in ("../x.jpg", "/etc/passwd", "a/../../x.jpg", "C:\\x.jpg"):
        with pytest.raises(ValueError):
            resolve_inside(tmp_path, bad)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    for h, w in [(100, 100), (1080, 1920), (37, 900), (3000, 20), (448, 448)]:
        assert smart_resize(h, w, 28, 3136, 200704) == ref(h, w, 28, 3136, 200704)


def test_wukong_csv_img2dataset_naming(tmp_path):
    from gill.annotate.sources import read_wukong_csv

    (tmp_path / "00000").mkdir()
    (tmp_path / "00000" / "000000001.jpg").write_bytes(b"x")
    (tmp_path / "w.csv").write_text('url,caption\nhttp://a/0.jpg,猫\nhttp://a/1.jpg,"狗, 白色"\nbroken\n',
                                    encoding="utf-8")
    items = list(read_wukong_csv(str(tmp_path / "w.csv"), str(tmp_path)))
    assert [(i["id"], i["image"], i["caption"], i["error"][:13]) for i in items] == [
        ("wukong_000000000", "00000/000000000.jpg", "猫", ""), ("wukong_000000001", "00000/000000001.jpg", "狗, 白色", ""),
        ("wukong_000000002", "", "", "malformed_row")]


def test_webdataset_source_extracts_images(tmp_path):
    import io
    import tarfile

    from gill.annotate.sources import load_image, read_webdataset

    buf = io.BytesIO()
    Image.new("RGB", (120, 90), (0, 255, 0)).save(buf, format="JPEG")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, payload in [("000000000.jpg", buf.getvalue()), ("000000000.txt", "绿色的草地".encode()),
                              ("000000001.txt", b"no image")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    items = list(read_webdataset(str(tmp_path / "*.tar"), str(tmp_path / "images")))
    assert [i["id"] for i in items] == ["wds_000000000", "wds_000000001"]
    assert items[1]["error"].startswith("malformed_row")
    row = load_image(items[0])
    assert not row["error"] and (row["width"], row["height"]) == (120, 90)
    assert (tmp_path / "images" / items[0]["image"]).is_file()
