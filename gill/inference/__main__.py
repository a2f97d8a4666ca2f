"""CLI: ``python -m gill.inference {generate,caption,retrieve,chat} --adapter PATH ...``.

argparse rather than Hydra: inference takes per-call inputs (prompts, boxes, file lists) more than
configuration, and the model configuration already travels inside ``adapter.safetensors``. Model
keys that differ on this machine are overridden with ``--set key=value`` (repeatable, values parsed
as YAML), e.g. ``--set pretrained_path=/data/Kolors-diffusers --set vision_path=/data/clip``.
See docs/inference.md for examples.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def parse_object(text: str) -> tuple[str, list[float]]:
    """``"橘猫:0.1,0.3,0.55,0.9"`` -> ``("橘猫", [0.1, 0.3, 0.55, 0.9])`` (full-width ``：`` accepted)."""
    text = text.replace("：", ":").replace("，", ",")
    label, sep, box = text.rpartition(":")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"object {text!r} is not LABEL:x1,y1,x2,y2")
    try:
        values = [float(v) for v in box.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"object {text!r}: box {box!r} is not four numbers") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"object {text!r}: box needs 4 numbers, got {len(values)}")
    return label, values


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def _load(args):
    from gill.inference.loading import load_trained

    return load_trained(args.adapter, parse_overrides(args.set), device=args.device, dtype=args.dtype)


def _read_layout(path: str) -> tuple[str | None, list[tuple[str, list[float]]]]:
    """A layout JSON in the dataset's record format: ``{"caption"|"prompt", "objects": [{label, bbox}]}``."""
    rec = json.loads(Path(path).read_text(encoding="utf-8"))
    prompt = rec.get("prompt", rec.get("caption"))
    return prompt, [(o["label"], o["bbox"]) for o in rec.get("objects", [])]


def cmd_generate(args) -> int:
    from PIL.PngImagePlugin import PngInfo

    from gill.inference.layout_pipeline import generate_layout, normalize_objects
    from gill.inference.overlay import draw_layout

    prompt, objects = (None, [])
    if args.layout:
        prompt, objects = _read_layout(args.layout)
    prompt = args.prompt if args.prompt is not None else prompt
    if prompt is None:
        raise SystemExit("generate needs --prompt (or a layout file with a caption/prompt)")
    objects = objects + list(args.object)
    model = _load(args)
    images = generate_layout(
        model, prompt, objects, negative_prompt=args.negative_prompt, steps=args.steps,
        guidance_scale=args.guidance_scale, beta=args.beta, seed=args.seed, height=args.height, width=args.width,
        num_images=args.num_images, use_mapper=args.use_mapper, box_unit=args.box_unit,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w, h = images[0].size
    norm = normalize_objects(objects, args.box_unit, w, h)
    for i, im in enumerate(images):
        seed = im.info["seed"]
        record = {"prompt": prompt, "seed": seed, "objects": [{"label": lab, "bbox": list(b)} for lab, b in norm]}
        info = PngInfo()
        info.add_text("gill", json.dumps(record, ensure_ascii=False))
        path, overlay = out / f"{i:02d}_seed{seed}.png", out / f"{i:02d}_seed{seed}_layout.png"
        im.save(path, pnginfo=info)
        draw_layout(im, norm).save(overlay)
        print(json.dumps({"image": str(path), "overlay": str(overlay), **record}, ensure_ascii=False))
    return 0


def open_image(path: str, skipped: list[str]):
    """The RGB image at ``path``, or ``None`` (warned on stderr, appended to ``skipped``) when it cannot
    be read: one bad file in a folder of thousands must not cost the others their output."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files; each means "skip it"
        print(f"warning: skipping unreadable image {path}: {type(e).__name__}: {e}", file=sys.stderr)
        skipped.append(path)
        return None


def _report_skipped(skipped: list[str], total: int) -> int:
    if skipped:
        print(f"skipped {len(skipped)} of {total} images (unreadable)", file=sys.stderr)
    return 1 if total and len(skipped) == total else 0


def cmd_caption(args) -> int:
    from gill.inference.captioning import caption

    model = _load(args)
    skipped: list[str] = []
    for start in range(0, len(args.images), args.batch_size):
        loaded = [(p, open_image(p, skipped)) for p in args.images[start : start + args.batch_size]]
        loaded = [(p, im) for p, im in loaded if im is not None]
        if not loaded:
            continue
        texts = caption(model, [im for _, im in loaded], max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
        for (p, _), t in zip(loaded, texts):
            print(json.dumps({"image": p, "caption": t}, ensure_ascii=False))
    return _report_skipped(skipped, len(args.images))


def cmd_retrieve(args) -> int:
    from PIL import Image

    from gill.inference.retrieval import RetrievalIndex

    model = _load(args)
    if args.action == "build":
        from gill.inference.retrieval import list_images

        paths, skipped = list_images(args.images), []
        readable = [p for p in paths if open_image(p, skipped) is not None]
        if not readable:
            raise SystemExit(f"no readable images under {args.images}")
        index = RetrievalIndex.build(model, readable, batch_size=args.batch_size)
        index.save(args.index)
        print(json.dumps({"index": args.index, "images": len(index), "skipped": len(skipped)}, ensure_ascii=False))
        _report_skipped(skipped, len(paths))
    elif args.action == "text":
        index = RetrievalIndex.load(args.index)
        for text, hits in zip(args.texts, index.query_text(model, args.texts, k=args.k)):
            print(json.dumps({"text": text, "hits": hits}, ensure_ascii=False))
    else:
        with Image.open(args.image) as im:
            hits = RetrievalIndex.query_image(model, im.convert("RGB"), args.captions, k=args.k)
        print(json.dumps({"image": args.image, "hits": hits}, ensure_ascii=False))
    return 0


def cmd_chat(args) -> int:
    from gill.inference.interleaved import generate_for_text
    from gill.inference.retrieval import RetrievalIndex

    model = _load(args)
    index = RetrievalIndex.load(args.index) if args.index else None
    out_dir = Path(args.out)
    for prompt in args.prompts:
        res = generate_for_text(
            model, prompt, max_new_tokens=args.max_new_tokens, min_word_tokens=args.min_word_tokens, index=index,
            k=args.k, generate=args.generate, steps=args.steps, seed=args.seed,
        )
        record = {"prompt": prompt, "text": res.text, "image": res.wants_image}
        if res.wants_image and index is not None:
            record["hits"] = res.hits
        if res.images:
            out_dir.mkdir(parents=True, exist_ok=True)
            record["generated"] = []
            for im in res.images:
                path = out_dir / f"chat_{len(list(out_dir.glob('chat_*.png'))):03d}_seed{im.info['seed']}.png"
                im.save(path)
                record["generated"].append(str(path))
        print(json.dumps(record, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--adapter", required=True, help="trained adapter.safetensors")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config key stored in the adapter (repeatable)")
    common.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    common.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 | auto (default: the stored config's)")

    p = argparse.ArgumentParser(
        prog="python -m gill.inference",
        description="Inference with a trained GILL adapter: layout-controlled generation, captioning, retrieval. "
        "See docs/inference.md.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", parents=[common], help="layout-controlled text-to-image")
    g.add_argument("--prompt")
    g.add_argument("--object", action="append", type=parse_object, default=[], metavar="LABEL:x1,y1,x2,y2",
                   help="one object and its box (repeatable)")
    g.add_argument("--layout", help="JSON with caption/prompt and objects [{label, bbox}] (the dataset format)")
    g.add_argument("--box-unit", default="norm", choices=("norm", "1000", "pixel", "xywh_pixel"))
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance-scale", type=float, default=5.0)
    g.add_argument("--beta", type=float, default=0.3, help="fraction of steps with the layout adapter on")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--use-mapper", action="store_true", help="condition through the LLM + GILL mapper")
    g.add_argument("--out", default="outputs/generate")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("caption", parents=[common], help="caption images")
    c.add_argument("images", nargs="+")
    c.add_argument("--max-new-tokens", type=int, default=32)
    c.add_argument("--num-beams", type=int, default=1)
    c.add_argument("--batch-size", type=int, default=8)
    c.set_defaults(func=cmd_caption)

    r = sub.add_parser("retrieve", help="build an image index / query it")
    rsub = r.add_subparsers(dest="action", required=True)
    rb = rsub.add_parser("build", parents=[common], help="index the image files in a folder")
    rb.add_argument("--images", required=True, help="folder of images")
    rb.add_argument("--index", required=True, help="output directory")
    rb.add_argument("--batch-size", type=int, default=32)
    rt = rsub.add_parser("text", parents=[common], help="texts -> top-k images from an index")
    rt.add_argument("texts", nargs="+")
    rt.add_argument("--index", required=True)
    rt.add_argument("-k", type=int, default=5)
    ri = rsub.add_parser("image", parents=[common], help="one image -> top-k of the given captions")
    ri.add_argument("image")
    ri.add_argument("--captions", nargs="+", required=True)
    ri.add_argument("-k", type=int, default=5)
    r.set_defaults(func=cmd_retrieve)

    t = sub.add_parser("chat", parents=[common], help="continue prompts; the model decides when to show an image")
    t.add_argument("prompts", nargs="+")
    t.add_argument("--max-new-tokens", type=int, default=32)
    t.add_argument("--min-word-tokens", type=int, default=0, help="no [IMG] before this many new tokens")
    t.add_argument("--index", help="retrieval index directory: retrieve when the model emits [IMG]")
    t.add_argument("-k", type=int, default=1)
    t.add_argument("--generate", action="store_true", help="generate an image (GILL mapper) when it emits [IMG]")
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="outputs/chat")
    t.set_defaults(func=cmd_chat)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
