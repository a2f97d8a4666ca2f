"""The inference CLI keeps going past unreadable images; the layout overlay never hides a box edge.

The model is replaced by stubs here (what is tested is the CLI's handling of files, not the model:
tests/test_inference.py runs the CLI on the tiny stack).
"""
import json

import numpy as np
import torch
from PIL import Image

from gill.inference import __main__ as cli
from gill.inference.overlay import PALETTE, draw_layout


def _folder(tmp_path):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all" * 4)
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "c.png")
    return [str(tmp_path / n) for n in ("a.png", "b.jpg", "c.png")]


def test_caption_skips_unreadable_images(tmp_path, monkeypatch, capsys):
    from gill.inference import captioning

    paths = _folder(tmp_path)
    monkeypatch.setattr(cli, "_load", lambda args: object())
    monkeypatch.setattr(captioning, "caption", lambda model, images, **kw: [f"{im.getpixel((0, 0))}" for im in images])
    assert cli.main(["caption", "--adapter", "x", *paths, "--batch-size", "2"]) == 0
    out = capsys.readouterr()
    recs = [json.loads(line) for line in out.out.splitlines()]
    assert [r["image"] for r in recs] == [paths[0], paths[2]]
    assert recs[1]["caption"] == "(0, 0, 255)"
    assert "skipping unreadable image" in out.err and "skipped 1 of 3" in out.err
    # nothing readable at all: a failing exit code
    assert cli.main(["caption", "--adapter", "x", paths[1]]) == 1


def test_retrieve_build_skips_unreadable_images(tmp_path, monkeypatch, capsys):
    from gill.inference import retrieval

    (tmp_path / "imgs").mkdir()
    paths = _folder(tmp_path / "imgs")
    monkeypatch.setattr(cli, "_load", lambda args: object())
    monkeypatch.setattr(retrieval, "embed_images", lambda model, ims: torch.ones(len(ims), 4))
    assert cli.main(["retrieve", "build", "--adapter", "x", "--images", str(tmp_path / "imgs"),
                     "--index", str(tmp_path / "ix")]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == {"index": str(tmp_path / "ix"), "images": 2, "skipped": 1}
    assert json.loads((tmp_path / "ix" / "paths.json").read_text()) == [paths[0], paths[2]]
    assert "b.jpg" in out.err


def test_overlay_label_tabs_do_not_hide_box_edges():
    # box 1's left edge runs through box 0's label tab; box 2 is smaller than its own tab
    objects = [("一只很长很长的橘猫", (0.1, 0.1, 0.9, 0.9)), ("沙发", (0.2, 0.05, 0.6, 0.5)),
               ("杯子", (0.7, 0.6, 0.74, 0.64))]
    out = np.asarray(draw_layout(Image.new("RGB", (200, 200)), objects, line_width=2))
    assert tuple(out[30, 40]) == PALETTE[1]  # left edge of box 1, inside box 0's tab
    for x, y in [(144, 120), (144, 128), (140, 124), (148, 124)]:  # top, bottom, left, right of the small box
        assert tuple(out[y, x]) == PALETTE[2], (x, y)
