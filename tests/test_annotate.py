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
from gill.annotate.sources import resolve_inside, smart_resize, stable_id
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
        caption = f"一个红色的方块和一只橘猫，第{i}张"
        rows.append(f"{name}\t{caption}")
        rid = stable_id("img", name, caption)
        text = f"{R}方块{E}{B}({box1[0]},{box1[1]}),({box1[2]},{box1[3]}){F}{R}橘猫{E}{B}({box2[0]},{box2[1]}),({box2[2]},{box2[3]}){F}"
        if i == 3:  # a label the caption does not mention, and a same-label duplicate: both filtered
            text += f"{R}飞机{E}{B}(0,0),(500,500){F}{R}橘猫{E}{B}(601,51),(950,400){F}"
        forced[rid] = text
        expected[rid] = {("方块", tuple(v / 1000 for v in box1)), ("橘猫", tuple(v / 1000 for v in box2))}
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    Image.new("RGB", (600, 2)).save(images / "thin.png")  # 300:1
    Image.new("RGB", (64, 64)).save(images / "garbage.png")
    rows += ["corrupt.jpg\t一只坏掉的猫", "nope/missing.jpg\t一只不存在的猫", "a.jpg\tcaption\textra field",
             "thin.png\t一条细线", "../../etc/passwd\t逃出去的猫", "garbage.png\t一只猫"]
    forced[stable_id("img", "garbage.png", "一只猫")] = "I cannot find anything."  # garbage output
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
    assert sorted(v["reason"] for v in errs.values()) == sorted(
        ["unreadable_image", "missing_file", "malformed_row", "aspect_ratio", "bad_path", "no_boxes_parsed"])
    assert {k: v["reason"] for k, v in errs.items() if not k.startswith("img_")} == {
        "corrupt.jpg": "unreadable_image", "nope/missing.jpg": "missing_file", "thin.png": "aspect_ratio",
        "garbage.png": "no_boxes_parsed"}
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
            # no ray.num_gpus_per_actor: the default must not ask a CPU-only cluster for GPUs
            "ray.enabled": "true", "ray.num_actors": 2,
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
    assert [i["id"] for i in items] == [stable_id("wds", "00000/000000000", "绿色的草地"),
                                        stable_id("wds", "00000/000000001", "no image")]
    assert items[1]["error"].startswith("malformed_row")
    row = load_image(items[0])
    assert not row["error"] and (row["width"], row["height"]) == (120, 90)
    assert (tmp_path / "images" / items[0]["image"]).is_file()


def test_plan_ray_actors_fits_the_cluster():
    import warnings

    from gill.annotate.pipeline import plan_ray_actors

    rc = {"num_actors": 2, "num_gpus_per_actor": None, "num_cpus_per_actor": 1, "num_cpus_per_task": 1}
    assert plan_ray_actors(rc, {"CPU": 16.0}) == (2, 0.0, 1.0)  # no GPU in the cluster: CPU actors
    assert plan_ray_actors(rc, {"CPU": 16.0, "GPU": 2.0}) == (2, 1.0, 1.0)
    with pytest.warns(UserWarning, match="only 1 fit"):
        assert plan_ray_actors(rc, {"CPU": 16.0, "GPU": 1.0}) == (1, 1.0, 1.0)
    with pytest.warns(UserWarning, match="only 1 fit"):  # decoding tasks keep one CPU
        assert plan_ray_actors(rc, {"CPU": 2.0}) == (1, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="no annotation actor fits"):
        plan_ray_actors({**rc, "num_gpus_per_actor": 1}, {"CPU": 16.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_ray_actors({**rc, "num_actors": 4}, {"CPU": 5.0})


def test_missing_model_path_fails_before_any_output(data, tmp_path):
    from gill.annotate import run_annotation

    out = tmp_path / "out" / "layout.jsonl"
    with pytest.raises(FileNotFoundError, match="no such directory"):
        run_annotation(_cfg(data, out, **{"backend.model_path": tmp_path / "nope"}), print_summary=False)
    assert not (tmp_path / "out").exists()


def test_inserting_a_row_annotates_only_the_new_image(data, single_run, tmp_path):
    import shutil

    from gill.annotate import run_annotation

    ref, _ = single_run
    out = tmp_path / "layout.jsonl"
    for name in ("layout.jsonl", "layout.errors.jsonl"):
        shutil.copy(ref.with_name(name), tmp_path / name)
    rows = (data["root"] / "pairs.tsv").read_text(encoding="utf-8").splitlines()
    rows.insert(1, "000.png\t一个新的红色方块")  # a new first row moves every other row down
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    summary = run_annotation(_cfg(data, out, **{"source.path": tmp_path / "pairs.tsv"}), print_summary=False)
    assert summary["skipped_done"] == N_GOOD + 6 and summary["processed"] == 1
    new_id = stable_id("img", "000.png", "一个新的红色方块")
    lines = _lines(out) + _lines(tmp_path / "layout.errors.jsonl")
    assert sum(json.loads(line)["id"] == new_id for line in lines) == 1


def test_utf8_bom_accepted_other_encodings_rejected(tmp_path):
    from gill.annotate.sources import read_pairs

    (tmp_path / "a.jpg").write_bytes(b"x")
    raw = ("\ufeffimage\tcaption\n".encode("utf-8") + "a.jpg\t一只猫\n".encode("utf-8")
           + "a.jpg\t一只狗\n".encode("gbk") + "a.jpg\tcaf\u00e9\n".encode("latin-1"))
    (tmp_path / "p.tsv").write_bytes(raw)
    items = list(read_pairs(str(tmp_path / "p.tsv"), str(tmp_path)))
    assert [(i["caption"], i["error"].split(":")[0]) for i in items][0] == ("一只猫", "")
    assert [i["error"].split(":")[0] for i in items[1:]] == ["bad_encoding", "bad_encoding"]
    json.dumps(items[1], ensure_ascii=False).encode("utf-8")  # the error record stays writable


def test_ids_are_stable_under_row_insertion(tmp_path):
    from gill.annotate.sources import read_pairs

    (tmp_path / "a.tsv").write_text("a.jpg\t猫\nb.jpg\t狗\n", encoding="utf-8")
    (tmp_path / "b.tsv").write_text("c.jpg\t鸟\na.jpg\t猫\nb.jpg\t狗\n", encoding="utf-8")
    ids_a = [i["id"] for i in read_pairs(str(tmp_path / "a.tsv"), str(tmp_path))]
    ids_b = [i["id"] for i in read_pairs(str(tmp_path / "b.tsv"), str(tmp_path))]
    assert ids_b[1:] == ids_a and ids_b[0] not in ids_a


# ---------------------------------------------------------------------------- img2dataset output

def write_img2dataset_shard(folder: Path, shard: int, rows: list[dict], output_format: str) -> None:
    """Write one shard exactly as img2dataset's writers do (``img2dataset/writer.py``): for every input
    row a line of ``NNNNN.parquet``; for each success the image, caption and metadata as ``NNNNN/KEY.jpg``
    + ``.txt`` + ``.json`` (files) or as one sample of ``NNNNN.tar`` written by webdataset's TarWriter,
    which img2dataset itself uses; and ``NNNNN_stats.json``."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"{shard:05d}"
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int64()),
                        ("height", pa.int64()), ("original_width", pa.int64()), ("original_height", pa.int64()),
                        ("exif", pa.string()), ("sha256", pa.string())])
    metas, tar = [], None
    if output_format == "webdataset":
        import webdataset as wds
        tar = wds.TarWriter(str(folder / f"{name}.tar"))
    else:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(rows):
        key = f"{name}{i:04d}"
        meta = {"url": r["url"], "caption": r["caption"], "key": key, "status": r.get("status", "success"),
                "error_message": r.get("error_message"), "width": None, "height": None, "original_width": None,
                "original_height": None, "exif": None, "sha256": None}
        if meta["status"] == "success":
            buf = io.BytesIO()
            r["image"].save(buf, format="JPEG")
            w, h = r.get("declared", r["image"].size)
            meta.update(width=w, height=h, original_width=w * 2, original_height=h * 2)
            if tar is not None:
                tar.write({"__key__": key, "jpg": buf.getvalue(), "txt": r["caption"],
                           "json": json.dumps(meta, indent=4)})
            else:
                (folder / name / f"{key}.jpg").write_bytes(buf.getvalue())
                (folder / name / f"{key}.txt").write_text(r["caption"])
                (folder / name / f"{key}.json").write_text(json.dumps(meta, indent=4))
        metas.append(meta)
    if tar is not None:
        tar.close()
    pq.write_table(pa.Table.from_pylist(metas, schema), folder / f"{name}.parquet")
    statuses = [m["status"] for m in metas]
    (folder / f"{name}_stats.json").write_text(json.dumps({
        "count": len(rows), "successes": statuses.count("success"),
        "failed_to_download": statuses.count("failed_to_download"),
        "failed_to_resize": statuses.count("failed_to_resize"),
        "status_dict": {s: statuses.count(s) for s in set(statuses)}}, indent=4))


def _img2dataset_rows():
    img = lambda c: Image.new("RGB", (96, 64), c)  # noqa: E731
    return [
        {"url": "http://x/0.jpg", "caption": "一只红色的猫", "image": img((255, 0, 0))},
        {"url": "http://x/1.jpg", "caption": "一只狗", "status": "failed_to_download",
         "error_message": "HTTP Error 404: Not Found"},
        {"url": "http://x/2.jpg", "caption": "绿色的草地", "image": img((0, 255, 0))},
        {"url": "http://x/3.jpg", "caption": "小鸟", "status": "failed_to_resize",
         "error_message": "image too small"},
        {"url": "http://x/4.jpg", "caption": "蓝色的天空", "image": img((0, 0, 255)), "declared": (100, 64)},
    ]


@pytest.mark.parametrize("output_format", ["files", "webdataset"])
def test_img2dataset_output_is_read_from_its_metadata(tmp_path, output_format):
    from gill.annotate.sources import iter_items, load_image

    folder = tmp_path / "wukong"
    folder.mkdir()
    write_img2dataset_shard(folder, 0, _img2dataset_rows(), output_format)
    write_img2dataset_shard(folder, 1, _img2dataset_rows()[:2], output_format)
    items = list(iter_items({"kind": "img2dataset", "path": str(folder), "image_root": None}))
    assert len(items) == 7 and len({i["id"] for i in items}) == 5  # shard 1 repeats two (url, caption) pairs
    by_url = {}
    for it in items:
        by_url.setdefault(it.get("url"), it)
    assert by_url["http://x/0.jpg"]["image"] == "00000/000000000.jpg"
    assert by_url["http://x/0.jpg"]["id"] == stable_id("wukong", "http://x/0.jpg", "一只红色的猫")
    assert by_url["http://x/1.jpg"]["error"] == "failed_to_download: HTTP Error 404: Not Found"
    assert by_url["http://x/3.jpg"]["error"] == "failed_to_resize: image too small"
    rows = {u: load_image(it) for u, it in by_url.items()}
    assert not rows["http://x/2.jpg"]["error"] and (rows["http://x/2.jpg"]["width"], rows["http://x/2.jpg"]["height"]) == (96, 64)
    assert (folder / by_url["http://x/2.jpg"]["image"]).is_file()  # webdataset: extracted next to the shards
    assert rows["http://x/4.jpg"]["error"].startswith("size_mismatch")


def test_img2dataset_webdataset_run_counts_failed_downloads(data, tmp_path):
    from gill.annotate import run_annotation

    folder = tmp_path / "wukong"
    folder.mkdir()
    write_img2dataset_shard(folder, 0, _img2dataset_rows(), "webdataset")
    out = tmp_path / "layout.jsonl"
    summary = run_annotation(_cfg(data, out, **{"source.kind": "img2dataset", "source.path": folder,
                                                "source.image_root": "null"}), print_summary=False)
    assert summary["items_read"] == 5
    assert summary["errors_by_reason"]["failed_to_download"] == 1
    assert summary["errors_by_reason"]["failed_to_resize"] == 1
    assert summary["errors_by_reason"]["size_mismatch"] == 1
    assert summary["processed"] == 5


def test_model_inputs_equal_qwen_vl_utils_and_the_processor(data, tmp_path):
    """Our CPU-side resize + input building against the Qwen authors' path: ``qwen_vl_utils.process_vision_info``
    then ``Qwen2VLProcessor``. Both need torchvision, which has no build for the CPU torch pinned here
    (PyPI's wheels link the CUDA torch libraries): the test runs wherever torchvision imports."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a CUDA build beside a CPU torch raises RuntimeError, not ImportError
        pytest.skip(f"torchvision does not import ({type(e).__name__}: {str(e)[:80]}); no build matches this CPU "
                    "torch, and qwen_vl_utils and Qwen2VLProcessor need it for the reference inputs")
    import torch
    from omegaconf import OmegaConf
    from qwen_vl_utils import process_vision_info
    from qwen_vl_utils import smart_resize as reference_smart_resize
    from transformers import AutoProcessor

    from gill.annotate.backends import make_backend
    from gill.annotate.sources import load_image

    cfg = OmegaConf.to_container(_cfg(data, tmp_path / "unused.jsonl"), resolve=True)
    backend = make_backend(cfg["backend"], cfg["prompts"])
    b = cfg["backend"]
    processor = AutoProcessor.from_pretrained(data["model"], min_pixels=b["min_pixels"], max_pixels=b["max_pixels"])
    rng = np.random.default_rng(0)
    caption = "一只橘猫趴在沙发上"
    for w, h in [(100, 100), (640, 480), (37, 900), (1920, 1080), (300, 2000)]:
        assert smart_resize(h, w, backend.factor, b["min_pixels"], b["max_pixels"]) == reference_smart_resize(
            h, w, backend.factor, b["min_pixels"], b["max_pixels"])
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        image.save(tmp_path / "im.png")
        row = load_image({"id": "x", "path": str(tmp_path / "im.png")}, factor=backend.factor,
                         min_pixels=b["min_pixels"], max_pixels=b["max_pixels"])
        ours = {k: v.cpu() for k, v in backend.build_inputs([row["pixels"]], [caption]).items()}
        messages = [{"role": "user", "content": [
            {"type": "image", "image": image, "min_pixels": b["min_pixels"], "max_pixels": b["max_pixels"]},
            {"type": "text", "text": backend.prompt.format(caption=caption)}]}]
        images, _ = process_vision_info(messages, image_patch_size=backend.patch_size)
        assert np.array_equal(np.asarray(images[0]), row["pixels"])  # the same resize, bit for bit
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ref = processor(text=[text], images=images, padding=True, return_tensors="pt")
        for key in ("input_ids", "attention_mask", "image_grid_thw"):
            assert torch.equal(ours[key], ref[key]), (w, h, key)
        torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"].to(ours["pixel_values"].dtype))
