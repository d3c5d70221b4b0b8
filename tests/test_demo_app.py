"""The demo page (demo/app.py): answers, the kept image encoding and bad input through Flask's
test client; then the real thing: the server as a subprocess driven by headless Chromium, and a
bounded load test against it (slow)."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

pytest.importorskip(
    "flask", reason="the demo page needs Flask, the optional extra `demo` (pip install flask)"
)

import app as demo_app  # noqa: E402  (demo/ is on sys.path, see conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic", "instalign_tiny.yaml")
# The tiny config, smaller: a few 64 px images, timm's test ResNet, two iterations.
SMALL = [
    "DATASETS.SYNTHETIC.NUM_TRAIN_IMAGES", "8",
    "DATASETS.SYNTHETIC.NUM_VAL_IMAGES", "4",
    "DATASETS.SYNTHETIC.NUM_TEST_IMAGES", "2",
    "DATASETS.SYNTHETIC.IMAGE_SIZE", "64",
    "INPUT.IMAGE_SIZE", "64",
    "MODEL.TIMM.NAME", "test_resnet",
    "MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS", "1",
    "MODEL.TIMM.SYNTHETIC_PRETRAIN.IMS_PER_BATCH", "2",
    "SOLVER.IMS_PER_BATCH", "2",
    "TEST.EVAL_PERIOD", "0",
]  # fmt: skip
DOWNLOAD = re.compile(r'id="download-json"\s+href="data:application/json;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-iteration checkpoint of the small tiny config, made by train_net.py as a user would, with
    its synthetic dataset (and text encoder) in a folder of its own.

    INSTALIGN_DEMO_WEIGHTS=path/model_final.pth uses that model of the tiny config instead (with
    the dataset under $DETECTRON2_DATASETS), e.g. to take the README's screenshot of a trained one.
    """
    folder = tmp_path_factory.mktemp("demo_app")
    weights = os.environ.get("INSTALIGN_DEMO_WEIGHTS")
    if weights:
        root = demo_app.datasets_root()
        env = dict(os.environ, DETECTRON2_DATASETS=os.path.abspath(root))
        return {
            "opts": ["MODEL.WEIGHTS", os.path.abspath(weights)],
            "root": os.path.join(root, "synthetic_gres"),
            "env": env,
            "folder": folder,
        }
    env = dict(os.environ, DETECTRON2_DATASETS=str(folder / "datasets"), OMP_NUM_THREADS="1")
    output = folder / "train"
    argv = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, *SMALL]
    argv += ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(output)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        "train_net.py failed:\n" + done.stdout[-3000:] + done.stderr[-3000:]
    )
    root = folder / "datasets" / "synthetic_gres"
    opts = SMALL + [
        "MODEL.WEIGHTS", str(output / "model_final.pth"),
        "MODEL.TEXT_ENCODER.NAME", str(root / "text_encoder"),
    ]  # fmt: skip
    return {"opts": opts, "root": str(root), "env": env, "folder": folder}


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return demo_app.GRESPredictor(demo_app.load_config(CONFIG, checkpoint["opts"]), cache_size=4)


@pytest.fixture(scope="module")
def client(predictor, checkpoint):
    examples = demo_app.find_examples(checkpoint["root"])
    app = demo_app.create_app(predictor, config=CONFIG, examples=examples)
    return app.test_client()


def scene(height=90, width=120, seed=0) -> np.ndarray:
    """An RGB image of a red rectangle and a blue disc on grey."""
    image = np.full((height, width, 3), 40, np.uint8)
    image[10 : height // 2, 10 : width // 2] = (220, 30, 30)
    yy, xx = np.mgrid[:height, :width]
    image[
        (yy - 3 * height // 4) ** 2 + (xx - 3 * width // 4) ** 2 < (min(height, width) // 6) ** 2
    ] = (30, 60, 220)
    image[0, 0] = (seed, 0, 0)
    return image


def encode(image, format="PNG", **save) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(
        buffer, format=format, **save
    )
    return buffer.getvalue()


def post(client, data=None, files=None, **fields):
    form = dict(fields)
    for name, (filename, payload) in (files or {}).items():
        form[name] = (io.BytesIO(payload), filename)
    response = client.post("/", data=form, content_type="multipart/form-data")
    return response.status_code, response.get_data(as_text=True)


def errors_of(html: str):
    block = re.search(
        r'<div class="errors" id="errors" role="alert"><ul>(.*?)</ul></div>', html, re.S
    )
    return re.findall(r"<li>(.*?)</li>", block.group(1), re.S) if block else []


def record_of(html: str):
    match = DOWNLOAD.search(html)
    return json.loads(base64.b64decode(match.group(1))) if match else None


def image_id_of(html: str) -> str:
    return re.search(r'name="image_id" value="([0-9a-f]+)"', html).group(1)


def check_page_against_json(html: str, record, height: int, width: int):
    """Each answer on the page says what the JSON says: the same no-target verdict and masks of the
    image's size (empty when no target)."""
    articles = re.findall(
        r'<article class="answer" id="answer-(\d+)" data-no-target="(true|false)"\s+data-nt-prob="([0-9.]+)">(.*?)</article>',
        html,
        re.S,
    )
    assert len(articles) == len(record["answers"])
    assert (record["height"], record["width"]) == (height, width)
    for (index, no_target, nt_prob, body), answer in zip(articles, record["answers"]):
        assert (no_target == "true") == answer["no_target"]
        assert float(nt_prob) == pytest.approx(answer["nt_prob"], abs=1e-4)
        assert ("No target" in body) == answer["no_target"]
        mask = mask_util.decode(
            {"size": answer["mask_rle"]["size"], "counts": answer["mask_rle"]["counts"].encode()}
        )
        assert mask.shape == (height, width) and int(mask.sum()) == answer["mask_area"]
        if answer["no_target"]:
            assert answer["mask_area"] == 0
        else:
            assert f"merged mask of {answer['mask_area']} px" in body
        for instance in answer["instances"]:
            assert tuple(instance["mask_rle"]["size"]) == (height, width)
        shown = body.count('class="swatch"')
        assert shown == min(3, len(answer["instances"]))
        picture = re.search(r'src="data:image/png;base64,([^"]+)"', body).group(1)
        assert Image.open(io.BytesIO(base64.b64decode(picture))).width >= 2 * min(
            width, demo_app.PANEL_SIDE
        )


def test_page_answers_each_expression_with_picture_and_json(client):
    response = client.get("/")
    status, html = response.status_code, response.get_data(as_text=True)
    assert (
        status == 200
        and 'id="image-file"' in html
        and 'id="expressions"' in html
        and "answers" not in html
    )
    status, html = post(
        client,
        files={"image": ("scene.png", encode(scene()))},
        expressions="the red square\n\n  the purple cone  \n",
    )
    assert status == 200, errors_of(html)
    assert errors_of(html) == []
    record = record_of(html)
    assert record["image"] == "scene.png"
    assert [a["expression"] for a in record["answers"]] == [
        "the red square",
        "the purple cone",
    ]  # blank lines skipped
    check_page_against_json(html, record, 90, 120)
    assert 'download="scene_instalign.json"' in html
    assert "the red square\n\n  the purple cone" in html  # the text box keeps what was typed


def test_same_image_is_encoded_once_while_it_stays_on_the_page(client, predictor):
    calls = []
    hook = predictor.model.backbone.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        image = encode(scene(seed=11))
        status, html = post(client, files={"image": ("a.png", image)}, expressions="the red square")
        assert status == 200 and len(calls) == 1
        # A second set of expressions about the image on the page: no upload, no backbone pass.
        status, html = post(
            client, image_id=image_id_of(html), expressions="both blue circles\nthe purple cone"
        )
        assert status == 200 and len(calls) == 1
        assert [a["expression"] for a in record_of(html)["answers"]] == [
            "both blue circles",
            "the purple cone",
        ]
        assert record_of(html)["image"] == "a.png"
        # The same file uploaded again is recognised by its content.
        status, html = post(
            client, files={"image": ("again.png", image)}, expressions="the red square"
        )
        assert status == 200 and len(calls) == 1
        status, html = post(
            client, files={"image": ("b.png", encode(scene(seed=12)))}, expressions="the red square"
        )
        assert status == 200 and len(calls) == 2
    finally:
        hook.remove()


def test_requests_at_once_get_the_answers_they_get_one_by_one(client, predictor):
    """The server answers requests in threads: tokenising, encoding and drawing at once must give
    every request the answer it gets alone (a fast tokenizer's settings are shared state)."""
    from concurrent.futures import ThreadPoolExecutor

    assert predictor.model.text_encoder.tokenizer is predictor.tokenizer
    texts = ["the red square\nthe purple cone", "both blue circles"]
    jobs = [(encode(scene(seed=40 + i)), texts[i % 2]) for i in range(8)]

    def ask(job):
        status, html = post(client, files={"image": ("s.png", job[0])}, expressions=job[1])
        assert status == 200, errors_of(html)
        return [
            (a["expression"], a["mask_rle"]["counts"], a["nt_prob"])
            for a in record_of(html)["answers"]
        ]

    alone = [ask(job) for job in jobs]
    predictor._features.clear()  # each image encoded again, now while the others are
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(ask, jobs))
    assert together == alone


def long_expression(predictor) -> str:
    text = "the red square"
    while predictor.token_count(text) <= predictor.max_tokens:
        text += " and the blue circle"
    return text


@pytest.mark.parametrize(
    "case, expected",
    [
        ("not an image", "notes.png: not an image that can be read"),
        ("too small", "tiny.png: image is 100x20 px; InstAlign needs at least 32 px per side"),
        ("too large", "huge.png: image is 4100x40 px; the largest side may be 4000 px"),
        ("empty file", "empty.png: the file is empty"),
        ("truncated", "cut.png: the image cannot be decoded"),
        ("no expression", "Type at least one expression"),
        ("blank lines only", "Type at least one expression"),
        ("too long", "has {tokens} tokens; the model reads at most {max_tokens}"),
        ("too many", "17 expressions: ask at most 16 at once"),
        ("no image", "Choose an image: upload one, or pick an example"),
        ("forgotten image", "The image is no longer kept on the server"),
    ],
)
def test_bad_input_gets_a_message_and_the_page_keeps_working(client, predictor, case, expected):
    png = encode(scene())
    image = {"image": ("scene.png", png)}
    text = "the red square"
    long_text = long_expression(predictor)
    requests = {
        "not an image": dict(
            files={"image": ("notes.png", b"this is not an image")}, expressions=text
        ),
        "too small": dict(files={"image": ("tiny.png", encode(scene(20, 100)))}, expressions=text),
        "too large": dict(
            files={"image": ("huge.png", encode(np.zeros((40, 4100, 3), np.uint8)))},
            expressions=text,
        ),
        "empty file": dict(files={"image": ("empty.png", b"")}, expressions=text),
        "truncated": dict(files={"image": ("cut.png", png[: len(png) // 2])}, expressions=text),
        "no expression": dict(files=image, expressions=""),
        "blank lines only": dict(files=image, expressions="  \n\t\n"),
        "too long": dict(files=image, expressions=long_text),
        "too many": dict(files=image, expressions="\n".join(["the red square"] * 17)),
        "no image": dict(expressions=text),
        "forgotten image": dict(image_id="0" * 32, expressions=text),
    }
    status, html = post(client, **requests[case])
    assert status == 400
    expected = expected.format(
        tokens=predictor.token_count(long_text), max_tokens=predictor.max_tokens
    )
    messages = errors_of(html)
    assert len(messages) == 1 and expected in messages[0], messages
    assert record_of(html) is None and '<form id="ask"' in html
    status, html = post(client, files=image, expressions=text)  # the next request is answered
    assert status == 200 and len(record_of(html)["answers"]) == 1


def test_a_too_long_expression_is_reported_and_the_others_answered(client, predictor):
    long_text = long_expression(predictor)
    status, html = post(
        client,
        files={"image": ("s.png", encode(scene()))},
        expressions=f"the red square\n{long_text}\nthe purple cone",
    )
    assert status == 200
    assert [a["expression"] for a in record_of(html)["answers"]] == [
        "the red square",
        "the purple cone",
    ]
    (message,) = errors_of(html)
    assert message.startswith("Expression 2 (") and f"at most {predictor.max_tokens}" in message


def test_a_failed_upload_keeps_the_previous_image_on_the_page(client):
    status, html = post(
        client, files={"image": ("first.png", encode(scene(seed=21)))}, expressions="the red square"
    )
    first = image_id_of(html)
    status, html = post(
        client,
        files={"image": ("notes.png", b"nope")},
        image_id=first,
        expressions="the red square",
    )
    assert status == 400 and image_id_of(html) == first and "first.png" in html


def test_upload_over_the_size_limit_gets_a_message(predictor):
    app = demo_app.create_app(predictor)
    app.config["MAX_CONTENT_LENGTH"] = 10_000
    status, html = post(
        app.test_client(), files={"image": ("big.png", os.urandom(20_000))}, expressions="x"
    )
    assert status == 413
    assert f"larger than {demo_app.MAX_UPLOAD_MB} MB" in errors_of(html)[0]


def test_image_modes_are_read_as_the_command_line_demo_reads_them(client):
    rgb = Image.fromarray(scene())
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees -> 120 high, 90 wide
    files = {
        "grey.png": (encode(rgb.convert("L")), (90, 120)),
        "rgba.png": (encode(rgb.convert("RGBA")), (90, 120)),
        "deep16.png": (
            encode(Image.fromarray(scene()[:, :, 0].astype(np.uint16) * 257)),
            (90, 120),
        ),
        "cmyk.jpg": (encode(rgb.convert("CMYK"), "JPEG"), (90, 120)),
        "rotated.jpg": (encode(rgb, "JPEG", exif=exif), (120, 90)),
        "palette.gif": (encode(rgb.convert("P"), "GIF"), (90, 120)),
    }
    assert Image.open(io.BytesIO(files["deep16.png"][0])).mode.startswith("I;16")
    for name, (payload, (height, width)) in files.items():
        status, html = post(client, files={"image": (name, payload)}, expressions="the red square")
        assert status == 200, (name, errors_of(html))
        check_page_against_json(html, record_of(html), height, width)
    # A 16-bit image is scaled to 8 bits, not clipped to white: its preview is not blank.
    status, html = post(
        client,
        files={"image": ("deep16.png", files["deep16.png"][0])},
        expressions="the red square",
    )
    thumb = re.search(r'id="current-image" src="data:image/png;base64,([^"]+)"', html).group(1)
    assert np.asarray(Image.open(io.BytesIO(base64.b64decode(thumb)))).min() < 100


def test_examples_come_with_their_dataset_expressions(client, checkpoint):
    examples = demo_app.find_examples(checkpoint["root"])
    assert 1 <= len(examples) <= demo_app.NUM_EXAMPLES
    html = client.get("/").get_data(as_text=True)
    assert all(f'href="/example/{ex.name}"' in html for ex in examples)
    chosen = examples[0]
    response = client.get(f"/example/{chosen.name}")
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and chosen.name in html and 'id="current-image"' in html
    assert chosen.expressions and all(e in html for e in chosen.expressions)
    status, html = post(
        client, image_id=image_id_of(html), expressions="\n".join(chosen.expressions)
    )
    assert status == 200 and len(record_of(html)["answers"]) == len(chosen.expressions)
    assert client.get("/example/..%2F..%2Fgrefs(unc).json").status_code == 404
    assert demo_app.find_examples(str(checkpoint["folder"] / "nothing")) == []


def test_without_a_trained_model_it_stops_with_one_line(tmp_path, capsys):
    rc = demo_app.main(["--config-file", CONFIG, "--opts", "OUTPUT_DIR", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"no trained model at {tmp_path / 'out' / 'model_final.pth'}" in err[0]
    assert "make train" in err[0] and "MODEL.WEIGHTS" in err[0]
    rc = demo_app.main(
        ["--config-file", CONFIG, "--opts", "MODEL.WEIGHTS", str(tmp_path / "no.pth")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no such file" in err[0]


# ---------------------------------------------------------------- the server, a browser, load
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


@pytest.fixture(scope="module")
def server(checkpoint):
    """demo/app.py as a user starts it, on a free port of 127.0.0.1; yields its address."""
    argv = [
        sys.executable,
        os.path.join(REPO, "demo", "app.py"),
        "--config-file",
        CONFIG,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--opts",
        *checkpoint["opts"],
    ]
    log = open(checkpoint["folder"] / "server.log", "w+")
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=log, text=True, env=checkpoint["env"], cwd=REPO
    )
    try:
        url = None
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            url = match.group(1) if match else None
        if url is None:
            log.seek(0)
            pytest.fail(f"the demo server did not start: {log.read()[-3000:]}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def browser_paths():
    """(chromium, chromedriver) of the system, or a skip that says what to install."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip(
            "Selenium is not installed: pip install selenium (it drives the system's Chromium)"
        )

    def first(*candidates):
        return next((c for c in candidates if c and os.path.isfile(c)), None)

    chromium = first(
        os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")
    )
    driver = first(
        os.environ.get("CHROMEDRIVER"),
        shutil.which("chromedriver"),
        "/usr/lib/chromium/chromedriver",
    )
    if not chromium or not driver:
        missing = " and ".join(
            n for n, p in (("chromium", chromium), ("chromedriver", driver)) if not p
        )
        pytest.skip(f"{missing} not installed: apt-get install chromium chromium-driver")
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(300)
    try:
        yield driver
    finally:
        driver.quit()


def full_page_screenshot(driver, path):
    """The whole page, not only the window: the viewport is stretched to the page's height."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    metrics = {
        "width": 1280,
        "height": min(int(height), 8000),
        "deviceScaleFactor": 1,
        "mobile": False,
    }
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def submit_and_wait(driver, expressions, image_path=None):
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if image_path is not None:
        driver.find_element(By.ID, "image-file").send_keys(
            os.path.abspath(image_path)
        )  # the browser wants an absolute path
    box = driver.find_element(By.ID, "expressions")
    box.clear()
    box.send_keys("\n".join(expressions))
    # The answer is a new page. A mark on the old page's window tells them apart; polling an old
    # element instead races the navigation (Chrome may answer "node does not belong to the
    # document" rather than "stale"), so errors while the page changes only mean "not yet".
    driver.execute_script("window.instalignOldPage = true")
    driver.find_element(By.ID, "submit").click()
    WebDriverWait(driver, 300, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(
            "return !window.instalignOldPage && document.readyState === 'complete'"
        )
    )
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"
        )
    )


@pytest.mark.slow
def test_page_in_a_real_browser(browser, server, checkpoint, tmp_path):
    from selenium.webdriver.common.by import By

    examples = demo_app.find_examples(checkpoint["root"])
    # An image of the val split with one expression that has a target and one that has none.
    example = next((ex for ex in examples if len(ex.expressions) == 2), examples[0])
    image_path = example.path
    expressions = (
        example.expressions
        if len(example.expressions) == 2
        else ["the red square", "the purple elephant"]
    )
    height, width = Image.open(image_path).size[::-1]

    browser.get(server)
    assert "InstAlign" in browser.title
    submit_and_wait(browser, expressions, image_path)
    assert not browser.find_elements(By.ID, "errors")
    html = browser.page_source
    record = record_of(html)
    assert [a["expression"] for a in record["answers"]] == expressions
    check_page_against_json(html, record, height, width)
    pictures = browser.find_elements(By.CSS_SELECTOR, "img.answer-picture")
    assert len(pictures) == 2 and all(
        p.size["width"] > 100 and p.size["height"] > 50 for p in pictures
    )
    for article, answer in zip(
        browser.find_elements(By.CSS_SELECTOR, "article.answer"), record["answers"]
    ):
        assert ("No target" in article.text) == answer["no_target"]  # what a person reads
    full_page_screenshot(browser, tmp_path / "demo_page.png")
    if os.environ.get("INSTALIGN_DEMO_SCREENSHOT"):
        full_page_screenshot(browser, os.environ["INSTALIGN_DEMO_SCREENSHOT"])
    assert Image.open(tmp_path / "demo_page.png").size[0] >= 1000

    # More questions about the image on the page, with nothing uploaded again.
    submit_and_wait(browser, ["the small circle"])
    record = record_of(browser.page_source)
    assert [a["expression"] for a in record["answers"]] == ["the small circle"]
    assert record["image"] == os.path.basename(image_path)

    # A file that is not an image: a message, and the page still answers afterwards.
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    submit_and_wait(browser, ["the red square"], notes)
    assert "not an image that can be read" in browser.find_element(By.ID, "errors").text
    submit_and_wait(browser, ["the red square"], image_path)
    assert (
        not browser.find_elements(By.ID, "errors")
        and len(record_of(browser.page_source)["answers"]) == 1
    )


@pytest.mark.slow
def test_load_16_requests_4_at_a_time(server, checkpoint):
    script = os.path.join(REPO, "tools", "load_test_demo.py")
    done = subprocess.run(
        [sys.executable, script, "--url", server, "--requests", "16", "--concurrency", "4"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(done.stdout)
    server_log = (checkpoint["folder"] / "server.log").read_text()[-4000:]  # the why of an HTTP 500
    assert done.returncode == 0, done.stdout + done.stderr + "\nserver log:\n" + server_log
    assert "16/16 answered (0 failed or lost)" in done.stdout
    assert re.search(r"latency p50 \d+\.\d+ s, p95 \d+\.\d+ s", done.stdout)


def test_load_script_refuses_addresses_off_this_machine(load_tool):
    load_test_demo = load_tool("load_test_demo")
    assert load_test_demo.is_loopback("http://127.0.0.1:7860/") and load_test_demo.is_loopback(
        "http://localhost:1/"
    )
    assert not load_test_demo.is_loopback("http://10.0.0.1:7860/")
    assert load_test_demo.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert load_test_demo.percentile([float(i) for i in range(1, 21)], 95) == 19.0
    with pytest.raises(SystemExit):
        load_test_demo.main(["--url", "http://192.168.1.1:7860/"])
