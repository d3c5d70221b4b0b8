#!/usr/bin/env python
"""InstAlign in the browser: an image and referring expressions in, each expression's answer out.

    make demo                       # the model that `make train` wrote
    python demo/app.py --config-file configs/synthetic/instalign_tiny.yaml \\
        --opts MODEL.WEIGHTS output/synthetic/instalign_tiny/model_final.pth \\
        [--host 127.0.0.1 --port 7860]

It prints the page's address. On the page: upload an image (or pick one of the synthetic val
images when the dataset is there), type expressions one per line, press "Segment". Each expression
gets the picture that demo/demo.py draws (the merged mask, the top instances with their relevance
scores, the words each instance aligns with highlighted in its colour, or NO TARGET with its
probability), and the JSON that demo/demo.py writes can be downloaded.

The image is encoded once for all its expressions and its encoding is kept while it stays on the
page: asking more about the same image runs only the expression path. Needs Flask (the optional
extra ``demo``); without a trained model it stops with one line that says how to get one.
"""

from __future__ import annotations

import warnings

# detectron2 decorates a few functions with torch.jit.script, which torch 2.14 deprecates; the
# warning says nothing to our users.
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

import argparse
import base64
import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor import (  # noqa: E402
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    BadInputError,
    GRESPredictor,
    build_config,
    check_image_size,
    image_record,
)

from instalign_d2.data.image_io import read_image_uint8  # noqa: E402
from instalign_d2.engine import ConfigError  # noqa: E402
from instalign_d2.utils.paths import datasets_root  # noqa: E402
from instalign_d2.utils.visualizer import instance_colour  # noqa: E402

logger = logging.getLogger("instalign_d2.demo.app")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "synthetic", "instalign_tiny.yaml")
MAX_UPLOAD_MB = 32  # a 4000 x 4000 PNG is well under this
MAX_EXPRESSIONS = 16  # per request: bounds the work one press of the button can ask for
PANEL_SIDE = 512  # answer pictures are drawn at most this large per panel, to fit the page
THUMB_SIDE = 160
NUM_EXAMPLES = 4
KEPT_IMAGES = 8  # images (and their encodings) kept for follow-up questions


@dataclass
class PageImage:
    """An image on the page: its content key (the hidden form field), name and BGR pixels."""

    key: str
    name: str
    bgr: np.ndarray

    @property
    def size(self) -> Tuple[int, int]:
        return int(self.bgr.shape[1]), int(self.bgr.shape[0])


class ImageStore:
    """The last few images that were on the page, so that a follow-up question need not upload its
    image again (the browser cannot refill a file field)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._images: "OrderedDict[str, PageImage]" = OrderedDict()
        self._lock = threading.Lock()

    def add(self, name: str, bgr: np.ndarray) -> PageImage:
        image = PageImage(GRESPredictor.image_key(bgr), name, bgr)
        with self._lock:
            self._images[image.key] = image
            self._images.move_to_end(image.key)
            while len(self._images) > self.capacity:
                self._images.popitem(last=False)
        return image

    def get(self, key: str) -> Optional[PageImage]:
        with self._lock:
            image = self._images.get(key)
            if image is not None:
                self._images.move_to_end(key)
            return image


def decode_image(data: bytes, name: str) -> np.ndarray:
    """The BGR uint8 pixels of an uploaded file, read as demo/demo.py reads files (greyscale, RGBA,
    16-bit, CMYK and EXIF-rotated images work), or :class:`BadInputError`."""
    if not data:
        raise BadInputError("the file is empty")
    try:  # the header alone: an oversized image is refused before its pixels are decoded
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Image.DecompressionBombError:
        raise BadInputError(
            "the image has too many pixels to be read safely; downscale it first"
        ) from None
    except (OSError, SyntaxError, ValueError):
        raise BadInputError(
            "not an image that can be read (use PNG, JPEG, BMP, TIFF, WebP, ...)"
        ) from None
    check_image_size(height, width)  # an EXIF rotation swaps the sides, the limits hold either way
    suffix = os.path.splitext(name)[1][:10]
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return read_image_uint8(tmp.name, "BGR")
        except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt pixel data
            raise BadInputError(
                f"the image cannot be decoded ({type(exc).__name__}: {exc})"
            ) from None


def parse_expressions(text: str, predictor: GRESPredictor) -> Tuple[List[str], List[str]]:
    """The expressions of the text box (one per non-blank line) that the model can read, and a
    message for each one it cannot."""
    lines = [line.strip() for line in (text or "").splitlines()]
    expressions = [line for line in lines if line]
    if not expressions:
        return [], ["Type at least one expression (one per line), e.g. 'the red circle'."]
    if len(expressions) > MAX_EXPRESSIONS:
        return [], [f"{len(expressions)} expressions: ask at most {MAX_EXPRESSIONS} at once."]
    kept, errors = [], []
    for number, expression in enumerate(expressions, start=1):
        tokens = predictor.token_count(expression)
        if tokens > predictor.max_tokens:
            errors.append(
                f"Expression {number} ('{_shorten(expression)}') has {tokens} tokens; the model reads at most "
                f"{predictor.max_tokens} (MODEL.TEXT_ENCODER.MAX_TOKENS, counting the start and end tokens): shorten it."
            )
        else:
            kept.append(expression)
    return kept, errors


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail_uri(bgr: np.ndarray, side: int = THUMB_SIDE) -> str:
    image = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
    image.thumbnail((side, side), Image.BILINEAR)
    return png_data_uri(image)


def rgb_css(colour) -> str:
    return "rgb({}, {}, {})".format(*colour)


@dataclass
class Example:
    name: str
    path: str
    thumb: str
    expressions: List[str]


def find_examples(root: Optional[str] = None, limit: int = NUM_EXAMPLES) -> List[Example]:
    """A few synthetic val images (when the dataset was generated), each with two of its dataset
    expressions: one that has a target and one that has none, when it has such."""
    root = root or os.path.join(datasets_root(), "synthetic_gres")
    folder = os.path.join(root, "images", "val")
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg")))[
        :limit
    ]
    sentences: Dict[str, Dict[bool, List[str]]] = {}
    try:
        with open(os.path.join(root, "grefs(unc).json")) as f:
            for ref in json.load(f):
                if ref.get("split") == "val":
                    by_kind = sentences.setdefault(
                        os.path.basename(ref["file_name"]), {True: [], False: []}
                    )
                    by_kind[bool(ref.get("no_target"))].extend(
                        s["raw"] for s in ref.get("sentences", [])
                    )
    except (OSError, ValueError, KeyError, TypeError):
        sentences = {}  # the images alone still make examples
    examples = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            thumb = thumbnail_uri(read_image_uint8(path, "BGR"), 96)
        except OSError:
            continue
        kinds = sentences.get(name, {True: [], False: []})
        expressions = kinds[False][:1] + kinds[True][:1]
        examples.append(Example(name, path, thumb, expressions))
    return examples


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>InstAlign demo</title>
<style>
  body { font-family: system-ui, -apple-system, "DejaVu Sans", sans-serif; margin: 1.2rem auto; max-width: 1120px;
         padding: 0 1rem; color: #222; }
  h1 { font-size: 1.5rem; margin: 0 0 .2rem; }
  .model { color: #666; font-size: .85rem; margin: 0 0 1rem; word-break: break-all; }
  form { display: grid; grid-template-columns: minmax(260px, 1fr) minmax(260px, 1fr); gap: 1rem; align-items: start; }
  fieldset { border: 1px solid #ccc; border-radius: 6px; padding: .6rem .8rem; margin: 0; }
  legend { font-weight: 600; }
  .current { display: flex; gap: .6rem; align-items: center; margin-bottom: .5rem; }
  .current img { max-width: 160px; max-height: 160px; border: 1px solid #ddd; }
  .examples { margin-top: .5rem; font-size: .9rem; }
  .examples a img { width: 64px; height: 64px; border: 2px solid transparent; vertical-align: middle; }
  .examples a:hover img { border-color: #0072b2; }
  textarea { width: 100%; box-sizing: border-box; font-size: 1rem; font-family: inherit; }
  .hint { color: #666; font-size: .8rem; }
  button { grid-column: 1 / -1; justify-self: start; font-size: 1rem; padding: .45rem 1.4rem; border-radius: 6px;
           border: 0; background: #0072b2; color: white; cursor: pointer; }
  .errors { background: #fdecea; border: 1px solid #e57373; border-radius: 6px; padding: .4rem 1rem; margin-bottom: 1rem; }
  .summary { margin: 1.2rem 0 .4rem; }
  .answer { border-top: 1px solid #ddd; padding: .6rem 0; }
  .answer h2 { font-size: 1.1rem; margin: .2rem 0; }
  .verdict .no-target { color: #b00020; }
  .verdict .target { color: #00684a; }
  .answer img { max-width: 100%; height: auto; }
  .instances { margin: .3rem 0; padding-left: 1.2rem; }
  .swatch { display: inline-block; width: .9em; height: .9em; border-radius: 2px; vertical-align: -.1em; margin-right: .3em; }
  mark { padding: 0 .2em; border-radius: 2px; }
</style>
</head>
<body>
<h1>InstAlign: segment what an expression refers to</h1>
<p class="model">Model: {{ weights }} · config {{ config }} · at most {{ max_tokens }} tokens per expression ·
  "no target" above p = {{ nt_threshold }}</p>
{% if errors %}
<div class="errors" id="errors" role="alert"><ul>{% for e in errors %}<li>{{ e }}</li>{% endfor %}</ul></div>
{% endif %}
<form id="ask" method="post" action="{{ url_for('answer') }}" enctype="multipart/form-data">
  <fieldset>
    <legend>1. Image</legend>
    {% if image %}
    <div class="current">
      <img id="current-image" src="{{ image_thumb }}" alt="the image on the page">
      <span id="current-name">{{ image.name }}<br>{{ image.size[0] }} × {{ image.size[1] }} px</span>
    </div>
    <input type="hidden" name="image_id" value="{{ image.key }}">
    {% endif %}
    <label>{{ "Another image" if image else "Upload an image" }}:
      <input type="file" id="image-file" name="image" accept="image/*"></label>
    <div class="hint">{{ min_side }} to {{ max_side }} px per side, up to {{ max_mb }} MB.</div>
    {% if examples %}
    <div class="examples">or an example:
      {% for ex in examples %}<a href="{{ url_for('example', name=ex.name) }}" title="{{ ex.name }}" class="example"><img src="{{ ex.thumb }}" alt="example {{ ex.name }}"></a>{% endfor %}
    </div>
    {% endif %}
  </fieldset>
  <fieldset>
    <legend>2. Expressions, one per line</legend>
    <textarea id="expressions" name="expressions" rows="5" placeholder="the red circle&#10;all squares on the left">{{ expressions }}</textarea>
    <div class="hint">Up to {{ max_expressions }} expressions; one that refers to nothing in the image is answered "no target".</div>
  </fieldset>
  <button id="submit" type="submit">Segment</button>
</form>
{% if answers %}
<section id="answers">
  <p class="summary">{{ answers|length }} answer{{ "s" if answers|length > 1 }} for {{ image.name }} in {{ "%.2f"|format(seconds) }} s.
    <a id="download-json" href="{{ json_uri }}" download="{{ json_name }}">Download the JSON</a>
    (masks as COCO RLE, scores, probabilities, aligned words).</p>
  {% for a in answers %}
  <article class="answer" id="answer-{{ loop.index0 }}" data-no-target="{{ 'true' if a.no_target else 'false' }}"
           data-nt-prob="{{ '%.4f'|format(a.nt_prob) }}">
    <h2>{{ loop.index }}. “{{ a.expression }}”</h2>
    <p class="verdict">{% if a.no_target %}<strong class="no-target">No target</strong>: p(no target) = {{ "%.2f"|format(a.nt_prob) }};
      the answer is an empty mask.{% else %}<strong class="target">Target found</strong>: merged mask of {{ a.mask_area }} px;
      p(no target) = {{ "%.2f"|format(a.nt_prob) }}.{% endif %}</p>
    <img class="answer-picture" src="{{ a.picture }}" alt="answer to {{ a.expression }}" width="{{ a.picture_size[0] }}" height="{{ a.picture_size[1] }}">
    {% if a.instances %}
    <ul class="instances">
      {% for inst in a.instances %}<li><span class="swatch" style="background: {{ inst.colour }}"></span>#{{ loop.index }}
        relevance {{ "%.2f"|format(inst.score) }}{% if inst.words %}, aligned with {% for w in inst.words %}<mark style="background: {{ inst.colour }}">{{ w }}</mark>{{ ", " if not loop.last }}{% endfor %}{% endif %}</li>
      {% endfor %}
    </ul>
    {% if a.more %}<p class="hint">{{ a.more }} more instance{{ "s" if a.more > 1 }} in the JSON.</p>{% endif %}
    {% endif %}
  </article>
  {% endfor %}
</section>
{% endif %}
</body>
</html>
"""


def create_app(
    predictor: GRESPredictor,
    weights: str = "",
    config: str = "",
    examples: Optional[List[Example]] = None,
    max_instances: int = 3,
):
    """The Flask application of the page around a loaded predictor."""
    from flask import Flask, render_template_string, request
    from werkzeug.exceptions import RequestEntityTooLarge

    app = Flask("instalign_demo")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_MB * 2**20
    store = ImageStore(KEPT_IMAGES)
    examples = list(examples or [])
    threshold = predictor.cfg.MODEL.INSTALIGN.TEST.NO_TARGET_THRESHOLD

    def page(
        status: int = 200,
        image: Optional[PageImage] = None,
        expressions: str = "",
        errors=(),
        **answer,
    ):
        html = render_template_string(
            PAGE,
            weights=_display_path(weights or predictor.cfg.MODEL.WEIGHTS) or "(random weights)",
            config=_display_path(config),
            max_tokens=predictor.max_tokens,
            nt_threshold=threshold,
            min_side=MIN_IMAGE_SIDE,
            max_side=MAX_IMAGE_SIDE,
            max_mb=MAX_UPLOAD_MB,
            max_expressions=MAX_EXPRESSIONS,
            examples=examples,
            image=image,
            image_thumb=thumbnail_uri(image.bgr) if image is not None else "",
            expressions=expressions,
            errors=list(errors),
            answers=answer.get("answers"),
            **{k: v for k, v in answer.items() if k != "answers"},
        )
        return html, status

    @app.get("/")
    def index():
        return page()

    @app.get("/example/<name>")
    def example(name: str):
        chosen = next((ex for ex in examples if ex.name == name), None)
        if chosen is None:  # only the listed files: the name never becomes a path by itself
            return page(404, errors=[f"No example named {name!r}."])
        try:
            image = store.add(chosen.name, read_image_uint8(chosen.path, "BGR"))
        except OSError as exc:  # the dataset changed since the server started
            return page(404, errors=[f"The example {name} cannot be read any more ({exc})."])
        return page(image=image, expressions="\n".join(chosen.expressions))

    @app.post("/")
    def answer():
        text = request.form.get("expressions", "")
        errors: List[str] = []
        previous = store.get(request.form.get("image_id", ""))
        image = None
        upload = request.files.get("image")
        if upload is not None and upload.filename:
            name = os.path.basename(upload.filename)
            try:
                image = store.add(name, decode_image(upload.read(), name))
            except BadInputError as exc:
                errors.append(f"{name}: {exc}")
        elif request.form.get("image_id"):
            image = previous
            if image is None:
                errors.append(
                    "The image is no longer kept on the server (it was restarted, or many images came after it): upload it again."
                )
        else:
            errors.append(
                "Choose an image: upload one" + (", or pick an example." if examples else ".")
            )
        expressions, expression_errors = parse_expressions(text, predictor)
        errors.extend(expression_errors)
        if image is None or not expressions:
            return page(400, image=image or previous, expressions=text, errors=errors)
        start = time.perf_counter()
        try:
            outputs = predictor(image.bgr, expressions)
            rgb = np.ascontiguousarray(image.bgr[:, :, ::-1])
            answers = [_answer_view(predictor, rgb, output, max_instances) for output in outputs]
        except BadInputError as exc:
            return page(400, image=image, expressions=text, errors=errors + [str(exc)])
        except Exception as exc:  # the page must stay usable whatever one request runs into
            logger.exception("demo page: the model failed on %s", image.name)
            return page(
                500,
                image=image,
                expressions=text,
                errors=errors + [f"The model failed on this input ({type(exc).__name__}: {exc})."],
            )
        record = image_record(image.name, image.bgr, outputs)
        json_uri = "data:application/json;base64," + base64.b64encode(
            json.dumps(record, indent=1).encode()
        ).decode("ascii")
        stem = os.path.splitext(image.name)[0] or "image"
        return page(
            200,  # answered; messages about skipped expressions show above the answers
            image=image,
            expressions=text,
            errors=errors,
            answers=answers,
            seconds=time.perf_counter() - start,
            json_uri=json_uri,
            json_name=f"{stem}_instalign.json",
        )

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_):
        return page(
            413,
            errors=[
                f"The upload is larger than {MAX_UPLOAD_MB} MB: downscale or compress the image."
            ],
        )

    return app


def _display_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (shorter on the page)."""
    if not path:
        return path
    relative = os.path.relpath(os.path.abspath(path))
    return path if relative.startswith("..") else relative


def _answer_view(
    predictor: GRESPredictor, rgb: np.ndarray, output: Dict, max_instances: int
) -> Dict:
    """What the page shows of one answer: the picture and the same facts as text."""
    picture = predictor.draw(rgb, output, max_instances=max_instances, max_panel_side=PANEL_SIDE)
    instances = output["instances"]
    shown = min(max_instances, len(instances))
    return {
        "expression": output["expression"],
        "no_target": output["no_target"],
        "nt_prob": float(output["nt_prob"]),
        "mask_area": int(output["mask"].sum()),
        "picture": png_data_uri(picture),
        "picture_size": picture.size,
        "instances": [
            {
                "score": float(instances.scores[k]),
                "words": output["instance_words"][k],
                "colour": rgb_css(instance_colour(k)),
            }
            for k in range(shown)
        ],
        "more": len(instances) - shown,
    }


def load_config(config_file: str, opts: List[str]):
    """The demo's config; without MODEL.WEIGHTS, the model_final.pth that training wrote to
    OUTPUT_DIR (the same config file with ``make train``)."""
    cfg = build_config(config_file, opts)
    if not cfg.MODEL.WEIGHTS:
        weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        if not os.path.isfile(weights):
            raise ConfigError(
                f"no trained model at {weights}: run `make train` first, or pass --opts MODEL.WEIGHTS path/to/model_final.pth"
            )
        cfg.defrost()
        cfg.MODEL.WEIGHTS = weights
        cfg.freeze()
    return cfg


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="InstAlign demo page in the browser",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--config-file", default=DEFAULT_CONFIG, metavar="FILE", help="default: %(default)s"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only)",
    )
    parser.add_argument(
        "--port", type=int, default=7860, help="0 picks a free port (default: %(default)s)"
    )
    parser.add_argument("--max-instances", type=int, default=3, help="instances drawn per answer")
    parser.add_argument(
        "--no-examples", action="store_true", help="do not offer the synthetic val images"
    )
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides, KEY VALUE pairs (e.g. MODEL.WEIGHTS model.pth)",
    )
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        import flask  # noqa: F401
    except ImportError:
        print(
            "demo: error: the demo page needs Flask, an optional extra: pip install flask (or run `make demo`)",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = load_config(args.config_file, args.opts)
        print(f"Loading {cfg.MODEL.WEIGHTS} ...", flush=True)
        predictor = GRESPredictor(cfg, cache_size=KEPT_IMAGES)
    # FileNotFoundError: e.g. the text encoder's folder of a config whose dataset is not there.
    except (ConfigError, FileNotFoundError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    from werkzeug.serving import make_server

    app = create_app(
        predictor,
        weights=cfg.MODEL.WEIGHTS,
        config=args.config_file,
        examples=[] if args.no_examples else find_examples(),
        max_instances=args.max_instances,
    )
    try:
        server = make_server(args.host, args.port, app, threaded=True)
    except OSError as exc:
        print(
            f"demo: error: cannot listen on {args.host}:{args.port} ({exc}); pass another --port",
            file=sys.stderr,
        )
        return 2
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"InstAlign demo page: http://{host}:{server.server_port}/  (Ctrl+C stops it)", flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
