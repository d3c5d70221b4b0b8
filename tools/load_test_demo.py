#!/usr/bin/env python
"""A bounded load test of the demo page (demo/app.py) running on this machine.

    python demo/app.py --port 7860 &
    python tools/load_test_demo.py --url http://127.0.0.1:7860/ [--requests 16 --concurrency 4]

Sends ``--requests`` form posts, ``--concurrency`` at a time, each with an image and the
expressions of ``--text`` (as the browser sends them), and checks each answer: HTTP 200 and a
JSON download with one answer per expression whose masks have the image's size. Prints how many
were answered and the latency percentiles; the exit status is 1 when any request was lost, failed
or answered wrongly. By default each request's image differs by one pixel, so every request pays
for the image encoding (``--same-image`` measures follow-up questions about one image instead).

Only loopback addresses are accepted: this is a test of one's own server, not of anyone else's.
"""

from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import json
import math
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

DOWNLOAD_LINK = re.compile(
    r'id="download-json"\s+href="data:application/json;base64,([A-Za-z0-9+/=]+)"'
)
DEFAULT_TEXTS = ("the red square", "the purple elephant")


class Outcome(NamedTuple):
    index: int
    seconds: float
    ok: bool
    detail: str


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addresses) and all(
        ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses
    )


def scene_png(index: int, side: int = 160) -> Tuple[bytes, Tuple[int, int]]:
    """A picture of two coloured shapes; ``index`` changes one pixel, so that each request's image
    is new to the server's encoding cache."""
    image = np.full((side, side, 3), 40, np.uint8)
    image[side // 8 : side // 2, side // 8 : side // 2] = (220, 30, 30)
    yy, xx = np.mgrid[:side, :side]
    image[(yy - 3 * side // 4) ** 2 + (xx - 2 * side // 3) ** 2 < (side // 6) ** 2] = (30, 60, 220)
    image[0, 0] = (index % 256, (index // 256) % 256, 7)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue(), (side, side)


def multipart(
    fields: Sequence[Tuple[str, str]], files: Sequence[Tuple[str, str, bytes]]
) -> Tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for name, filename, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def check_answer(html: str, texts: Sequence[str], size: Tuple[int, int]) -> Optional[str]:
    """None when the page answers every expression with masks of the image's size, else why not."""
    match = DOWNLOAD_LINK.search(html)
    if match is None:
        return "no JSON download on the page"
    record = json.loads(base64.b64decode(match.group(1)))
    answers = record.get("answers", [])
    if [a.get("expression") for a in answers] != list(texts):
        return f"answers for {[a.get('expression') for a in answers]}, asked {list(texts)}"
    height, width = size
    for answer in answers:
        if tuple(answer["mask_rle"]["size"]) != (height, width):
            return f"mask of size {answer['mask_rle']['size']}, image is {height}x{width}"
        if answer["no_target"] and answer["mask_area"] != 0:
            return "a no-target answer with a non-empty mask"
    return None


def one_request(
    url: str,
    index: int,
    texts: Sequence[str],
    image: Optional[Tuple[bytes, Tuple[int, int]]],
    timeout: float,
) -> Outcome:
    data, size = image if image is not None else scene_png(index)
    body, content_type = multipart(
        [("expressions", "\n".join(texts))], [("image", f"load_{index}.png", data)]
    )
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": content_type}, method="POST"
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            html = response.read().decode("utf-8")
            status = response.status
    except urllib.error.HTTPError as exc:
        return Outcome(index, time.perf_counter() - start, False, f"HTTP {exc.code}")
    except (urllib.error.URLError, OSError) as exc:
        return Outcome(index, time.perf_counter() - start, False, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - start
    if status != 200:
        return Outcome(index, seconds, False, f"HTTP {status}")
    problem = check_answer(html, texts, size)
    return Outcome(index, seconds, problem is None, problem or "answered")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def run(
    url: str,
    requests: int,
    concurrency: int,
    texts: Sequence[str],
    image_path: Optional[str],
    same_image: bool,
    timeout: float,
) -> Tuple[List[Outcome], float]:
    image = None
    if image_path:
        with open(image_path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size  # EXIF-rotated files are not supported here
        image = (data, (height, width))
    elif same_image:
        image = scene_png(0)
    start = time.perf_counter()
    outcomes: List[Outcome] = []
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(one_request, url, i, texts, image, timeout) for i in range(requests)]
        for future in as_completed(futures):
            outcomes.append(future.result())
    return sorted(outcomes, key=lambda o: o.index), time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--url", required=True, help="the page, e.g. http://127.0.0.1:7860/")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--text",
        action="append",
        help=f"an expression (repeat; default: {' / '.join(DEFAULT_TEXTS)})",
    )
    parser.add_argument(
        "--image", help="an image file to send (default: a generated 160x160 scene)"
    )
    parser.add_argument("--same-image", action="store_true", help="send the same image every time")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 1000 or not 1 <= args.concurrency <= 64:
        parser.error("--requests must be 1..1000 and --concurrency 1..64")
    if not is_loopback(args.url):
        parser.error(
            f"--url {args.url}: only this machine's loopback addresses (127.0.0.1, localhost, [::1]) are load-tested"
        )
    texts = args.text or list(DEFAULT_TEXTS)
    outcomes, wall = run(
        args.url, args.requests, args.concurrency, texts, args.image, args.same_image, args.timeout
    )
    answered = [o for o in outcomes if o.ok]
    for o in outcomes:
        if not o.ok:
            print(f"request {o.index}: FAILED after {o.seconds:.2f} s: {o.detail}")
    latencies = [o.seconds for o in outcomes]
    print(
        f"{len(answered)}/{args.requests} answered ({args.requests - len(answered)} failed or lost), "
        f"{args.concurrency} at a time, {len(texts)} expressions each, "
        f"{'the same image' if args.same_image or args.image else 'a new image'} per request"
    )
    print(
        f"latency p50 {percentile(latencies, 50):.2f} s, p95 {percentile(latencies, 95):.2f} s, "
        f"max {max(latencies):.2f} s; {args.requests / wall:.2f} requests/s over {wall:.1f} s"
    )
    return 0 if len(answered) == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
