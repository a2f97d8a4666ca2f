"""Table of cases for gill.data.grounding.parse_grounding, per output format."""
import pytest

from gill.data.grounding import FORMATS, parse_grounding

R, E, B, F = "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"


def q2(label, *boxes):
    return f"{R}{label}{E}" + "".join(f"{B}({a},{b}),({c},{d}){F}" for a, b, c, d in boxes)


# (name, text, width, height, expected [(label, (x1, y1, x2, y2))])
QWEN2VL = [
    ("one box", q2("cat", (100, 200, 500, 800)), None, None, [("cat", (0.1, 0.2, 0.5, 0.8))]),
    ("chinese label, two labels", q2("橘猫", (120, 300, 550, 900)) + q2("沙发", (0, 500, 1000, 1000)), None, None,
     [("橘猫", (0.12, 0.3, 0.55, 0.9)), ("沙发", (0.0, 0.5, 1.0, 1.0))]),
    ("several boxes per label", q2("狗", (0, 0, 100, 100), (500, 500, 700, 900)), None, None,
     [("狗", (0.0, 0.0, 0.1, 0.1)), ("狗", (0.5, 0.5, 0.7, 0.9))]),
    ("two point pairs in one block", f"{R}狗{E}{B}(0,0),(100,100),(500,500),(700,900){F}", None, None,
     [("狗", (0.0, 0.0, 0.1, 0.1)), ("狗", (0.5, 0.5, 0.7, 0.9))]),
    ("stray spaces", f"{R} cup {E}{B}( 10 , 20 ) , ( 300 ,400 ){F}", None, None, [("cup", (0.01, 0.02, 0.3, 0.4))]),
    ("swapped corners", q2("cup", (300, 400, 10, 20)), None, None, [("cup", (0.01, 0.02, 0.3, 0.4))]),
    ("past the range is clipped", q2("sky", (-5, 0, 1008, 300)), None, None, [("sky", (0.0, 0.0, 1.0, 0.3))]),
    ("far past the range is garbage", q2("sky", (0, 0, 5000, 300)), None, None, []),
    ("truncated mid-box", q2("cat", (100, 200, 500, 800)) + f"{R}dog{E}{B}(1,2),(3", None, None,
     [("cat", (0.1, 0.2, 0.5, 0.8))]),
    ("truncated mid-label", q2("cat", (100, 200, 500, 800)) + f"{R}do", None, None, [("cat", (0.1, 0.2, 0.5, 0.8))]),
    ("duplicate boxes", q2("cat", (100, 200, 500, 800)) * 3, None, None, [("cat", (0.1, 0.2, 0.5, 0.8))]),
    ("zero area dropped", q2("line", (100, 200, 100, 800)) + q2("cat", (1, 1, 2, 2)), None, None,
     [("cat", (0.001, 0.001, 0.002, 0.002))]),
    ("prose around", "Sure! " + q2("cat", (100, 200, 500, 800)) + " That's all.", None, None,
     [("cat", (0.1, 0.2, 0.5, 0.8))]),
    ("box without label", f"{B}(1,2),(3,4){F}", None, None, []),
    ("garbage", "I cannot help with that.", None, None, []),
    ("empty", "", None, None, []),
    ("empty label", q2("  ", (1, 2, 300, 400)), None, None, []),
]

JSON_ROWS = '[{"bbox_2d": [44.8, 89.6, 224, 448], "label": "猫"}, {"bbox_2d": [224, 0, 448, 224], "label": "cup"}]'
QWEN25VL = [  # pixels of a 448x448 resized input unless stated
    ("plain array", JSON_ROWS, 448, 448, [("猫", (0.1, 0.2, 0.5, 1.0)), ("cup", (0.5, 0.0, 1.0, 0.5))]),
    ("code fence + prose", f"```json\n{JSON_ROWS}\n```\nThese are the objects.", 448, 448,
     [("猫", (0.1, 0.2, 0.5, 1.0)), ("cup", (0.5, 0.0, 1.0, 0.5))]),
    ("json followed by prose, no fence", JSON_ROWS + " I hope this helps [1].", 448, 448,
     [("猫", (0.1, 0.2, 0.5, 1.0)), ("cup", (0.5, 0.0, 1.0, 0.5))]),
    ("truncated array", JSON_ROWS[:70], 448, 448, [("猫", (0.1, 0.2, 0.5, 1.0))]),
    ("unclosed fence, truncated", "```json\n" + JSON_ROWS[:70], 448, 448, [("猫", (0.1, 0.2, 0.5, 1.0))]),
    ("non-square frame", '[{"bbox_2d": [56, 28, 280, 140], "label": "dog"}]', 560, 280,
     [("dog", (0.1, 0.1, 0.5, 0.5))]),
    ("swapped corners", '[{"bbox_2d": [224, 448, 44.8, 89.6], "label": "猫"}]', 448, 448,
     [("猫", (0.1, 0.2, 0.5, 1.0))]),
    ("one pixel past the edge clipped", '[{"bbox_2d": [0, 0, 449, 224], "label": "sky"}]', 448, 448,
     [("sky", (0.0, 0.0, 1.0, 0.5))]),
    ("single object, not a list", '{"bbox_2d": [0, 0, 224, 224], "label": "a"}', 448, 448,
     [("a", (0.0, 0.0, 0.5, 0.5))]),
    ("wrapped in objects key", '{"objects": [{"bbox": [0, 0, 224, 224], "label": "a"}]}', 448, 448,
     [("a", (0.0, 0.0, 0.5, 0.5))]),
    ("several boxes per label", '[{"bbox_2d": [[0,0,224,224],[224,224,448,448]], "label": "a"}]', 448, 448,
     [("a", (0.0, 0.0, 0.5, 0.5)), ("a", (0.5, 0.5, 1.0, 1.0))]),
    ("duplicates", '[{"bbox_2d": [0,0,224,224], "label": "a"}, {"bbox_2d": [0,0,224,224], "label": "a"}]',
     448, 448, [("a", (0.0, 0.0, 0.5, 0.5))]),
    ("bad entries skipped", '[{"bbox_2d": [0,0,224], "label": "a"}, {"bbox_2d": "x", "label": "b"}, 5, '
     '{"label": "c"}, {"bbox_2d": [0,0,224,224]}, {"bbox_2d": [0,0,224,224], "label": "d"}]', 448, 448,
     [("d", (0.0, 0.0, 0.5, 0.5))]),
    ("missing frame", JSON_ROWS, None, None, []),
    ("garbage", "```json\n{not json at all", 448, 448, []),
    ("nan", '[{"bbox_2d": [NaN, 0, 1, 1], "label": "a"}]', 448, 448, []),
]

JSON1000 = [
    ("plain", '[{"bbox_2d": [100, 200, 500, 1000], "label": "猫"}]', None, None, [("猫", (0.1, 0.2, 0.5, 1.0))]),
    ("fence, prose", '好的：\n```json\n[{"bbox_2d": [100, 200, 500, 1000], "label": "猫"}]\n```\n以上。', None, None,
     [("猫", (0.1, 0.2, 0.5, 1.0))]),
    ("ignores width/height", '[{"bbox_2d": [100, 200, 500, 1000], "label": "猫"}]', 448, 224,
     [("猫", (0.1, 0.2, 0.5, 1.0))]),
    ("truncated", '[{"bbox_2d": [100, 200, 500, 1000], "label": "猫"}, {"bbox_2d": [1', None, None,
     [("猫", (0.1, 0.2, 0.5, 1.0))]),
    ("swapped + past range", '[{"bbox_2d": [1003, 200, 500, -2], "label": "猫"}]', None, None,
     [("猫", (0.5, 0.0, 1.0, 0.2))]),
    ("string numbers", '[{"bbox_2d": ["100", "200", "500", "1000"], "label": "猫"}]', None, None,
     [("猫", (0.1, 0.2, 0.5, 1.0))]),
    ("label with spaces and quotes", '[{"bbox_2d": [0, 0, 500, 500], "label": "  \\"red cup\\" "}]', None, None,
     [("red cup", (0.0, 0.0, 0.5, 0.5))]),
    ("empty list", "[]", None, None, []),
    ("prose only", "There are no objects.", None, None, []),
]

CASES = ([("qwen2vl", *c) for c in QWEN2VL] + [("qwen25vl", *c) for c in QWEN25VL]
         + [("json1000", *c) for c in JSON1000])


@pytest.mark.parametrize("fmt,name,text,width,height,expected", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_parse_grounding(fmt, name, text, width, height, expected):
    got = parse_grounding(text, width=width, height=height, fmt=fmt)
    assert [o.label for o in got] == [label for label, _ in expected]
    for obj, (_, box) in zip(got, expected):
        assert obj.bbox == pytest.approx(box, abs=1e-6)
        x1, y1, x2, y2 = obj.bbox
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("junk", [None, 42, b"bytes", "<|box_start|>" * 50, "[" * 1000, "{" * 1000, "\x00\xff",
                                  '[{"bbox_2d": [1e400, 0, 1, 1], "label": "a"}]'])
def test_never_raises_on_garbage(fmt, junk):
    assert parse_grounding(junk, width=448, height=448, fmt=fmt) == []


def test_unknown_format_is_a_programming_error():
    with pytest.raises(ValueError):
        parse_grounding("x", fmt="yolo")


def test_to_dict_is_rounded_list():
    (obj,) = parse_grounding(q2("猫", (123, 456, 789, 999)), fmt="qwen2vl")
    assert obj.to_dict() == {"label": "猫", "bbox": [0.123, 0.456, 0.789, 0.999]}
