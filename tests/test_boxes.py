"""normalize_bbox: one accept/reject table covering every unit, plus area and IoU."""
import math

import pytest

from gill.data.boxes import box_area, box_iou, normalize_bbox

NAN, INF = float("nan"), float("inf")

ACCEPT = [
    # (box, unit, width, height, expected)
    ([0.1, 0.2, 0.5, 0.6], "norm", None, None, (0.1, 0.2, 0.5, 0.6)),
    ((0, 0, 1, 1), "norm", None, None, (0.0, 0.0, 1.0, 1.0)),
    ([-0.01, 0.0, 1.015, 1.0], "norm", None, None, (0.0, 0.0, 1.0, 1.0)),  # clipped within tolerance
    ([100, 200, 500, 600], "1000", None, None, (0.1, 0.2, 0.5, 0.6)),
    ([0, 0, 1010, 1000], "1000", None, None, (0.0, 0.0, 1.0, 1.0)),  # VLM "edge" overshoot
    (["100", "200", "500", "600"], "1000", None, None, (0.1, 0.2, 0.5, 0.6)),  # numeric strings
    ([80, 60, 400, 300], "pixel", 800, 600, (0.1, 0.1, 0.5, 0.5)),
    ([0, 0, 801, 600], "pixel", 800, 600, (0.0, 0.0, 1.0, 1.0)),  # one past the border
    ([80, 60, 320, 240], "xywh_pixel", 800, 600, (0.1, 0.1, 0.5, 0.5)),
    ([0, 0, 800, 600], "xywh_pixel", 800, 600, (0.0, 0.0, 1.0, 1.0)),
]

REJECT = [
    # (box, unit, width, height, message fragment)
    ([0.1, 0.2, 0.5, 0.6], "percent", None, None, "unknown box unit"),
    ([0.1, 0.2, 0.5], "norm", None, None, "expected 4"),
    ([0.1, 0.2, 0.5, 0.6, 0.7], "norm", None, None, "expected 4"),
    (["a", 0.2, 0.5, 0.6], "norm", None, None, "not a sequence"),
    (None, "norm", None, None, "not a sequence"),
    # inverted
    ([0.5, 0.2, 0.1, 0.6], "norm", None, None, "inverted"),
    ([0.1, 0.6, 0.5, 0.2], "norm", None, None, "inverted"),
    ([500, 200, 100, 600], "1000", None, None, "inverted"),
    ([400, 60, 80, 300], "pixel", 800, 600, "inverted"),
    # zero area
    ([0.2, 0.2, 0.2, 0.5], "norm", None, None, "zero area"),
    ([100, 100, 500, 100], "1000", None, None, "zero area"),
    ([1.0, 0.1, 1.01, 0.5], "norm", None, None, "zero area"),  # zero once clipped into the frame
    ([80, 60, 80, 300], "pixel", 800, 600, "zero area"),
    ([80, 60, 0, 240], "xywh_pixel", 800, 600, "non-positive"),
    ([80, 60, 100, -5], "xywh_pixel", 800, 600, "non-positive"),
    # NaN / inf in every unit
    ([NAN, 0.2, 0.5, 0.6], "norm", None, None, "NaN or inf"),
    ([0.1, 0.2, INF, 0.6], "norm", None, None, "NaN or inf"),
    ([100, -INF, 500, 600], "1000", None, None, "NaN or inf"),
    ([80, 60, NAN, 300], "pixel", 800, 600, "NaN or inf"),
    ([80, 60, INF, 240], "xywh_pixel", 800, 600, "NaN or inf"),
    # out of range beyond the tolerance
    ([0.1, 0.1, 1.05, 0.5], "norm", None, None, "declared 'norm'"),
    ([-0.05, 0.1, 0.5, 0.5], "norm", None, None, "out of the frame"),
    ([0, 0, 1100, 500], "1000", None, None, "out of the frame"),
    ([-30, 0, 500, 500], "1000", None, None, "out of the frame"),
    ([0, 0, 900, 600], "pixel", 800, 600, "out of the frame"),
    ([700, 0, 200, 100], "xywh_pixel", 800, 600, "out of the frame"),
    # pixel values declared "norm"
    ([10, 20, 300, 400], "norm", None, None, "declared 'norm'"),
    ([100, 200, 500, 600], "norm", None, None, "declared 'norm'"),
    # pixel units without (valid) frame size
    ([80, 60, 400, 300], "pixel", None, None, "needs the frame"),
    ([80, 60, 400, 300], "pixel", 800, None, "needs the frame"),
    ([80, 60, 320, 240], "xywh_pixel", None, 600, "needs the frame"),
    ([80, 60, 400, 300], "pixel", 0, 600, "must be positive"),
    ([80, 60, 320, 240], "xywh_pixel", 800, -1, "must be positive"),
]


@pytest.mark.parametrize("box,unit,width,height,expected", ACCEPT)
def test_normalize_bbox_accepts(box, unit, width, height, expected):
    out = normalize_bbox(box, unit, width, height)
    assert isinstance(out, tuple) and len(out) == 4
    assert out == pytest.approx(expected, abs=1e-12)
    assert all(0.0 <= v <= 1.0 for v in out)


@pytest.mark.parametrize("box,unit,width,height,message", REJECT)
def test_normalize_bbox_rejects(box, unit, width, height, message):
    with pytest.raises(ValueError, match=message):
        normalize_bbox(box, unit, width, height)


def test_tolerance_is_a_parameter():
    assert normalize_bbox([0, 0, 1.05, 1], "norm", tolerance=0.1) == (0.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        normalize_bbox([0, 0, 1.01, 1], "norm", tolerance=0.0)


def test_area_and_iou():
    assert box_area((0.1, 0.2, 0.5, 0.6)) == pytest.approx(0.16)
    assert box_area((0.5, 0.5, 0.4, 0.9)) == 0.0  # inverted counts as empty
    assert box_iou((0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5)) == pytest.approx(1.0)
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0, 0.75, 0.5)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 0.2, 0.2), (0.5, 0.5, 1, 1)) == 0.0
    assert box_iou((0.3, 0.3, 0.3, 0.3), (0.3, 0.3, 0.3, 0.3)) == 0.0 and not math.isnan(
        box_iou((0.3, 0.3, 0.3, 0.3), (0.3, 0.3, 0.3, 0.3)))
