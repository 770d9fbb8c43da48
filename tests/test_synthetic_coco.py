"""The synthetic COCO (internvl_chat/devkit/coco.py), the data validator and tools/prepare_coco.sh."""

import contextlib
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from internvl_chat.cli import validate_data
from internvl_chat.data import validate
from internvl_chat.data.formats import (
    KARPATHY_TEST_GT_JSON,
    KARPATHY_TEST_JSON,
    KARPATHY_TRAIN_JSONL,
    image_id_from_name,
)
from internvl_chat.devkit import vocabulary
from internvl_chat.devkit.coco import IMAGE_SIZES, SyntheticCocoError, load_scenes, make_synthetic_coco

REPO = Path(__file__).resolve().parents[1]
PROMPT_TURN = "<image>\nProvide a one-sentence caption for the provided image."
COLOR_WORDS = "|".join(vocabulary.COLORS)
SHAPE_WORDS = "|".join(list(vocabulary.SHAPES) + list(vocabulary.PLURALS.values()))
THING = re.compile(rf"\b(a|an|two|three|four) (?:(?:small|large) )?({COLOR_WORDS}) ({SHAPE_WORDS})\b")


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "coco"
    make_synthetic_coco(root, train_images=60, test_images=20, seed=3)
    return root


def build_copy(coco: Path, tmp_path: Path) -> Path:
    """A private copy of the module's build that a test may damage."""
    return Path(shutil.copytree(coco, tmp_path / "coco"))


def test_layout_and_counts(coco):
    train_lines = (coco / "annotations" / KARPATHY_TRAIN_JSONL).read_text().splitlines()
    assert len(train_lines) == 60 * 5
    records = [json.loads(line) for line in train_lines]
    assert all(record["conversations"][0] == {"from": "human", "value": PROMPT_TURN} for record in records)
    assert all(record["conversations"][1]["from"] == "gpt" for record in records)
    train_images = {record["image"] for record in records}
    assert len(train_images) == 60
    # Karpathy train = train2014 plus "restval" images from val2014.
    assert {name.split("/")[0] for name in train_images} == {"train2014", "val2014"}
    for name in train_images:
        folder = name.split("/")[0]
        assert re.fullmatch(rf"{folder}/COCO_{folder}_\d{{12}}\.jpg", name), name

    test = json.loads((coco / "annotations" / KARPATHY_TEST_JSON).read_text())
    assert isinstance(test, list) and len(test) == 20
    assert all(entry["image"].startswith("val2014/COCO_val2014_") and len(entry["caption"]) == 5 for entry in test)
    test_ids = {image_id_from_name(entry["image"]) for entry in test}
    train_ids = {image_id_from_name(name) for name in train_images}
    assert len(test_ids) == 20 and not test_ids & train_ids


def test_ground_truth_loads_with_pycocotools(coco):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco / "annotations" / KARPATHY_TEST_GT_JSON))
    test = json.loads((coco / "annotations" / KARPATHY_TEST_JSON).read_text())
    assert gt.dataset["type"] == "captions" and "info" in gt.dataset and "licenses" in gt.dataset
    assert set(gt.getImgIds()) == {image_id_from_name(entry["image"]) for entry in test}
    for entry in test:  # the gt captions are the test json's references, in order
        image_id = image_id_from_name(entry["image"])
        assert [ann["caption"] for ann in gt.imgToAnns[image_id]] == entry["caption"]
        assert gt.imgs[image_id]["file_name"] == Path(entry["image"]).name
    assert len({ann["id"] for ann in gt.dataset["annotations"]}) == 100


def test_synthetic_set_passes_the_validator(coco, capsys):
    assert validate_data.main(["--root", str(coco), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "lines 300" in out and "unique images 60" in out and "OK" in out


def test_builds_are_deterministic(tmp_path):
    def digest(root: Path) -> dict:
        return {
            str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))
            if path.is_file()
        }

    first = make_synthetic_coco(tmp_path / "a", train_images=12, test_images=4, seed=7)
    second = make_synthetic_coco(tmp_path / "b", train_images=12, test_images=4, seed=7)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert first["train_lines"] == second["train_lines"] == 60
    other = make_synthetic_coco(tmp_path / "c", train_images=12, test_images=4, seed=8)
    assert digest(tmp_path / "c") != digest(tmp_path / "a")
    assert other["train_images"] == 12


def test_captions_describe_what_is_drawn(coco):
    scenes = load_scenes(coco)
    vocabulary_words = set(re.findall(r"[a-z]+", " ".join(vocabulary.vocabulary_sentences()).lower()))
    for scene in scenes:
        drawn = {(group["color"], group["shape"]): group["count"] for group in scene["groups"]}
        mentioned_anywhere = set()
        assert len(scene["captions"]) == 5 and len(set(scene["captions"])) == 5
        for caption in scene["captions"]:
            assert caption == caption.lower() and caption.endswith(".")
            assert 5 <= len(caption.split()) <= 24, caption
            assert set(re.findall(r"[a-z]+", caption)) <= vocabulary_words, caption
            for count_word, color, noun in THING.findall(caption):
                shape = noun if noun in vocabulary.SHAPES else noun[:-1]
                assert (color, shape) in drawn, (caption, drawn)
                count = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}[count_word]
                assert count == drawn[(color, shape)], (caption, drawn)
                mentioned_anywhere.add((color, shape))
            for group in scene["groups"]:
                if group["position"] in caption:  # a position is only ever said of the group that is there
                    place = vocabulary.POSITION_PHRASES[group["position"]]
                    assert re.search(rf"(circle|square|triangle|star)s? in the {place}", caption), caption
        assert mentioned_anywhere == set(drawn), (scene["captions"], drawn)
        # Only the two-group "X in the ... and Y in the ..." caption leaves the background out.
        with_background = [
            c
            for c in scene["captions"]
            if f"{scene['background']} background" in c
            or re.search(rf"\b{scene['background']} (picture|image|photo)\b", c)
        ]
        assert len(with_background) >= 4, (scene["captions"], scene["background"])

    # The pixels agree with the record: each shape's center has its colour, a corner has the background's.
    for scene in scenes[:20]:
        image = Image.open(coco / scene["image"]).convert("RGB")
        assert image.size == (scene["width"], scene["height"])
        assert _close(image.getpixel((1, 1)), vocabulary.BACKGROUNDS[scene["background"]])
        for group in scene["groups"]:
            for placed in group["shapes"]:
                x, y = placed["center"]
                assert _close(image.getpixel((int(x), int(y))), vocabulary.COLORS[group["color"]]), (scene, group)


def _close(pixel, rgb, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, rgb))


def test_image_sizes_and_aspect_ratios(tmp_path):
    make_synthetic_coco(tmp_path / "coco", train_images=150, test_images=30, seed=0)
    sizes = set()
    for scene in load_scenes(tmp_path / "coco"):
        with Image.open(tmp_path / "coco" / scene["image"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.add(image.size)
    assert sizes <= set(IMAGE_SIZES)
    # Landscape, portrait, both squares and the wide 16:9 all occur.
    for expected in [(640, 480), (480, 640), (640, 427), (500, 375), (480, 480), (640, 640), (640, 360)]:
        assert expected in sizes, expected


def test_refuses_to_overwrite_without_force(tmp_path):
    root = tmp_path / "coco"
    make_synthetic_coco(root, train_images=4, test_images=2)
    with pytest.raises(SyntheticCocoError, match="--force"):
        make_synthetic_coco(root, train_images=4, test_images=2)
    # --force replaces an earlier synthetic build, and leaves none of its images behind.
    old_images = {scene["image"] for scene in load_scenes(root)}
    make_synthetic_coco(root, train_images=3, test_images=2, seed=5, force=True)
    new_images = {scene["image"] for scene in load_scenes(root)}
    on_disk = {str(p.relative_to(root)) for p in root.glob("*2014/*.jpg")}
    assert on_disk == new_images and old_images - new_images
    # A folder that is not a synthetic build (a real download, say) is never touched, even with --force.
    real = tmp_path / "real"
    (real / "annotations").mkdir(parents=True)
    (real / "annotations" / KARPATHY_TRAIN_JSONL).write_text("{}\n")
    with pytest.raises(SyntheticCocoError, match="not a synthetic build"):
        make_synthetic_coco(real, train_images=4, test_images=2, force=True)
    assert (real / "annotations" / KARPATHY_TRAIN_JSONL).read_text() == "{}\n"


def test_cli_writes_summary_and_meta(tmp_path):
    out, meta = tmp_path / "coco", tmp_path / "meta.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "make_synthetic_coco.py"),
            "--out",
            str(out),
            "--train-images",
            "6",
            "--test-images",
            "3",
            "--meta",
            str(meta),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "30 caption lines" in result.stdout and str(out) in result.stdout
    entry = json.loads(meta.read_text())["coco_karpathy_train_567k"]
    assert entry["length"] == 30 and entry["annotation"].endswith(".jsonl")
    assert validate.validate_meta(meta, show_progress=False).ok
    again = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_synthetic_coco.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode != 0 and "--force" in again.stderr


# ----------------------------------------------------------------------------------------------- validator


def test_validator_catches_a_corrupt_jpeg(coco, tmp_path):
    root = build_copy(coco, tmp_path)
    test_image = json.loads((root / "annotations" / KARPATHY_TEST_JSON).read_text())[3]["image"]
    (root / test_image).write_bytes(b"this is not a JPEG")
    train_line = (root / "annotations" / KARPATHY_TRAIN_JSONL).read_text().splitlines()[11]
    train_image = json.loads(train_line)["image"]
    data = (root / train_image).read_bytes()
    (root / train_image).write_bytes(data[: len(data) // 2])  # a download cut in half: verify() alone misses it
    report = validate.validate_root(root, show_progress=False)
    assert not report.ok
    assert any(test_image in error and "cannot be read" in error for error in report.errors), report.errors
    # Reported at the first line that uses the image.
    first_use = next(
        number
        for number, line in enumerate((root / "annotations" / KARPATHY_TRAIN_JSONL).read_text().splitlines(), 1)
        if json.loads(line)["image"] == train_image
    )
    assert any(
        f"{KARPATHY_TRAIN_JSONL}:{first_use}: {train_image}: image cannot be read" in error for error in report.errors
    ), report.errors


def test_validator_catches_a_missing_image(coco, tmp_path, capsys):
    root = build_copy(coco, tmp_path)
    lines = (root / "annotations" / KARPATHY_TRAIN_JSONL).read_text().splitlines()
    missing = json.loads(lines[0])["image"]
    (root / missing).unlink()
    assert validate_data.main(["--root", str(root), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert f"{KARPATHY_TRAIN_JSONL}:1: image {missing} not found under {root}" in captured.err
    assert "FAILED" in captured.err


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ("{not json", "not valid JSON"),
        (
            '{"conversations": [{"from": "human", "value": "<image>\\nhi"}, {"from": "gpt", "value": "x"}]}',
            "1 <image> placeholder(s) for 0 image(s)",
        ),
        ('{"image": "train2014/x.jpg", "conversations": [{"from": "gpt", "value": "x"}]}', "no human turn"),
        (
            '{"image": "train2014/x.jpg", "conversations": [{"from": "human", "value": "a"}, '
            '{"from": "human", "value": "b"}]}',
            "alternate",
        ),
    ],
)
def test_validator_names_the_bad_jsonl_line(coco, tmp_path, capsys, bad_line, reason):
    root = build_copy(coco, tmp_path)
    jsonl = root / "annotations" / KARPATHY_TRAIN_JSONL
    lines = jsonl.read_text().splitlines()
    lines.insert(41, bad_line)  # becomes line 42
    jsonl.write_text("\n".join(lines) + "\n")
    assert validate_data.main(["--root", str(root), "--quiet"]) == 1
    err = capsys.readouterr().err
    first = err.split("first: ", 1)[1]
    assert first.startswith(f"{jsonl}:42: ") and reason in first, err


def test_validator_checks_the_meta_file(coco, tmp_path, capsys):
    shipped = json.loads((REPO / "shell" / "data" / "coco_caption.json").read_text())
    assert shipped == {
        "coco_karpathy_train_567k": {
            "root": "data/coco/",
            "annotation": f"data/coco/annotations/{KARPATHY_TRAIN_JSONL}",
            "data_augment": False,
            "repeat_time": 1,
            "length": 566747,
        }
    }
    # The shipped meta, pointed at the synthetic build: valid, with a warning about its length.
    meta = tmp_path / "meta.json"
    entry = dict(
        shipped["coco_karpathy_train_567k"],
        root=str(coco) + "/",
        annotation=str(coco / "annotations" / KARPATHY_TRAIN_JSONL),
    )
    meta.write_text(json.dumps({"coco_karpathy_train_567k": entry}))
    assert validate_data.main(["--meta", str(meta), "--quiet"]) == 0
    assert "length is 566747 but" in capsys.readouterr().out
    # An annotation that is not .jsonl, and a root that does not exist, are errors.
    meta.write_text(json.dumps({"coco": dict(entry, annotation=str(coco / "annotations" / KARPATHY_TEST_JSON))}))
    assert validate_data.main(["--meta", str(meta), "--quiet"]) == 1
    assert "must be a .jsonl" in capsys.readouterr().err
    meta.write_text(json.dumps({"coco": dict(entry, root=str(tmp_path / "nowhere"))}))
    assert validate_data.main(["--meta", str(meta), "--quiet"]) == 1
    assert f"image root {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_validator_checks_test_and_gt(coco, tmp_path):
    root = build_copy(coco, tmp_path)
    gt_path = root / "annotations" / KARPATHY_TEST_GT_JSON
    gt = json.loads(gt_path.read_text())
    dropped = gt["images"].pop(0)["id"]
    gt_path.write_text(json.dumps(gt))
    test_path = root / "annotations" / KARPATHY_TEST_JSON
    test = json.loads(test_path.read_text())
    test[1]["caption"] = []
    test_path.write_text(json.dumps(test))
    report = validate.validate_root(root, show_progress=False)
    assert any("test image ids have no entry" in error and str(dropped) in error for error in report.errors)
    assert any("entry 1: 'caption' must be" in error for error in report.errors)
    gt_path.write_text("[1, 2]")
    report = validate.validate_root(root, show_progress=False)
    assert any("pycocotools cannot load it" in error for error in report.errors), report.errors


def test_data_package_does_not_import_the_model():
    source = (REPO / "internvl_chat" / "data" / "validate.py").read_text()
    assert "internvl_chat.model" not in source and "from ..model" not in source


# ----------------------------------------------------------------------------------------------- prepare_coco.sh


def run_prepare(env_overrides: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **env_overrides}
    return subprocess.run(
        ["sh", str(REPO / "tools" / "prepare_coco.sh")], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_prepare_coco_is_posix_sh():
    dash = shutil.which("dash")
    if dash is None:
        pytest.skip("dash is not installed")
    subprocess.run([dash, "-n", str(REPO / "tools" / "prepare_coco.sh")], check=True)
    help_text = subprocess.run(
        [dash, str(REPO / "tools" / "prepare_coco.sh"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "COCO_ROOT" in help_text and "PREPARE_COCO_TIMEOUT" in help_text


@pytest.mark.parametrize("downloader", ["wget", "curl"])
@pytest.mark.parametrize("where", ["default servers", "closed port", "blackhole address"])
def test_prepare_coco_fails_fast_without_network(tmp_path, downloader, where):
    if shutil.which(downloader) is None:
        pytest.skip(f"{downloader} is not installed")
    urls = {
        # The real servers: offline machines must fail at once. Where the internet is reachable this case would
        # start a 20 GB download, so it runs only when the probe below says there is no network.
        "default servers": {},
        "closed port": {"COCO_IMAGES_URL": "http://127.0.0.1:9/zips", "KARPATHY_URL": "http://127.0.0.1:9/data"},
        # RFC 5737 TEST-NET-1: never routed; packets vanish or the route is refused.
        "blackhole address": {"COCO_IMAGES_URL": "http://192.0.2.1/zips", "KARPATHY_URL": "http://192.0.2.1/d"},
    }[where]
    if where == "default servers" and _internet_reachable():
        pytest.skip("the internet is reachable here; the default servers would really download COCO")
    root = tmp_path / "coco"
    start = time.monotonic()
    result = run_prepare(
        {"COCO_ROOT": str(root), "PREPARE_COCO_TIMEOUT": "2", "DOWNLOADER": downloader, **urls}, timeout=30
    )
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "cannot reach" in result.stderr and "make_synthetic_coco.py" in result.stderr, result.stderr
    assert elapsed < 15, f"took {elapsed:.1f} s to give up"
    assert not root.exists() or not any(root.rglob("*.part")), "nothing should be downloaded"


@functools.lru_cache(maxsize=1)
def _internet_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("images.cocodataset.org", 80), timeout=3).close()
        return True
    except OSError:
        return False


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.parametrize("downloader", ["wget", "curl"])
def test_prepare_coco_downloads_unpacks_validates_and_resumes(coco, tmp_path, downloader):
    """The whole script against a local web server that serves the synthetic build as the real archives."""
    if shutil.which(downloader) is None:
        pytest.skip(f"{downloader} is not installed")
    served = tmp_path / "served"
    (served / "zips").mkdir(parents=True)
    (served / "data").mkdir()
    for folder in ("train2014", "val2014"):
        with zipfile.ZipFile(served / "zips" / f"{folder}.zip", "w") as archive:
            for image in sorted((coco / folder).iterdir()):
                archive.write(image, f"{folder}/{image.name}")
    with zipfile.ZipFile(served / "data" / "coco_karpathy_train_567k.zip", "w") as archive:
        archive.write(coco / "annotations" / KARPATHY_TRAIN_JSONL, KARPATHY_TRAIN_JSONL)
    for name in (KARPATHY_TEST_JSON, KARPATHY_TEST_GT_JSON):
        shutil.copy(coco / "annotations" / name, served / "data" / name)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        root = tmp_path / "downloaded"
        env = {
            "COCO_ROOT": str(root),
            "COCO_IMAGES_URL": f"{base}/zips",
            "KARPATHY_URL": f"{base}/data",
            "PREPARE_COCO_TIMEOUT": "5",
            "DOWNLOADER": downloader,
            "VALIDATE_WORKERS": "2",
        }
        first = run_prepare(env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "OK: the data is ready" in first.stdout
        assert (root / "annotations" / KARPATHY_TRAIN_JSONL).read_bytes() == (
            coco / "annotations" / KARPATHY_TRAIN_JSONL
        ).read_bytes()
        assert len(list((root / "train2014").iterdir())) == len(list((coco / "train2014").iterdir()))
        assert not list(root.rglob("*.part"))

        # A second run downloads and unpacks nothing (it even works with the server gone) and validates again.
        server.shutdown()
        second = run_prepare(env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "downloading" not in second.stdout and "unpacking" not in second.stdout
        assert "already" in second.stdout and "OK: the data is ready" in second.stdout
    finally:
        server.shutdown()
        server.server_close()


def test_prepare_coco_reports_a_missing_file(tmp_path):
    """A server that is up but lacks the file: a clear failure naming the URL, nothing half-written."""
    (tmp_path / "empty").mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path / "empty"))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        root = tmp_path / "coco"
        result = run_prepare(
            {
                "COCO_ROOT": str(root),
                "COCO_IMAGES_URL": f"{base}/zips",
                "KARPATHY_URL": f"{base}/data",
                "PREPARE_COCO_TIMEOUT": "5",
            }
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode != 0
    assert f"downloading {base}/data/{KARPATHY_TEST_JSON} failed" in result.stderr, result.stderr
    assert not (root / "annotations" / KARPATHY_TEST_JSON).exists()
