"""One data contract (internvl_chat/data/formats.py): every reader of an annotation line gives it the same verdict,
the meta file is read one way, and the Karpathy names and the COCO ground truth have one definition."""

import contextlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from internvl_chat.cli import validate_data
from internvl_chat.data.dataset import build_datasets
from internvl_chat.data.formats import (
    KARPATHY_TEST_GT_JSON,
    KARPATHY_TEST_JSON,
    KARPATHY_TRAIN_JSONL,
    ConversationLine,
    MetaEntry,
    MetaError,
    coco_ground_truth,
    load_meta,
    read_line,
)
from internvl_chat.data.meta import screen_annotation
from internvl_chat.data.preprocess import IGNORE_INDEX, ConversationTokenizer
from internvl_chat.data.validate import validate_meta, validate_train_jsonl
from internvl_chat.eval.caption_sets import ground_truth_from_entries

REPO = Path(__file__).resolve().parents[1]


def conversation(*turns, image=None, **extra) -> str:
    item = {"conversations": [{"from": role, "value": text} for role, text in turns], **extra}
    if image is not None:
        item["image"] = image
    return json.dumps(item)


CAPTION = (("human", "<image>\nDescribe the picture."), ("gpt", "A red picture."))

# (what the line is, the raw line, whether it can be trained on)
LINES = [
    ("a caption line", conversation(*CAPTION, image="img/red.jpg"), True),
    ("user/assistant roles", conversation(("user", "Describe."), ("assistant", "Red."), image="img/red.jpg"), True),
    (
        "a leading system turn, no placeholder",
        conversation(("system", "Be brief."), ("human", "Describe."), ("gpt", "Red."), image="img/red.jpg"),
        True,
    ),
    ("a text-only line", conversation(("human", "Say hello."), ("gpt", "Hello.")), True),
    (
        "two images, two placeholders",
        conversation(("human", "<image> and <image>?"), ("gpt", "Red, blue."), image=["img/red.jpg", "img/blue.jpg"]),
        True,
    ),
    (
        "two images, no placeholder",
        conversation(("human", "Compare."), ("gpt", "Red, blue."), image=["img/red.jpg", "img/blue.jpg"]),
        True,
    ),
    (
        "several rounds ending with a question",
        conversation(("human", "<image>\nColour?"), ("gpt", "Red."), ("human", "Sure?"), image="img/red.jpg"),
        True,
    ),
    ("a stated length", conversation(*CAPTION, image="img/red.jpg", length=300), True),
    ("bad JSON", '{"image": "img/red.jpg", "conversations": [', False),
    ("not an object", "[1, 2, 3]", False),
    ("no conversations", json.dumps({"image": "img/red.jpg"}), False),
    (
        "a turn without value",
        json.dumps({"image": "img/red.jpg", "conversations": [{"from": "human"}, {"from": "gpt", "value": "Red."}]}),
        False,
    ),
    ("a turn that is a string", json.dumps({"conversations": ["hello", {"from": "gpt", "value": "Hi."}]}), False),
    ("non-alternating roles", conversation(("human", "<image>\nA?"), ("human", "B?"), image="img/red.jpg"), False),
    ("only an answer", conversation(("gpt", "Red."), image="img/red.jpg"), False),
    ("a system turn then an answer", conversation(("system", "Hi."), ("gpt", "Red."), image="img/red.jpg"), False),
    ("an empty answer", conversation(("human", "<image>\nA?"), ("gpt", "   "), image="img/red.jpg"), False),
    ("image a number", conversation(*CAPTION, image=5), False),
    ("image an empty path", conversation(*CAPTION, image=""), False),
    (
        "two images, one placeholder",
        conversation(*CAPTION, image=["img/red.jpg", "img/blue.jpg"]),
        False,
    ),
    ("a placeholder without an image", conversation(*CAPTION), False),
    ("a missing image file", conversation(*CAPTION, image="img/gone.jpg"), False),
    ("a length that is text", conversation(*CAPTION, image="img/red.jpg", length="300"), False),
]


@pytest.fixture
def annotation(tmp_path) -> tuple[Path, Path, dict[int, tuple[str, bool]]]:
    """The table written to one file, a blank line between every two lines; (root, file, line number -> entry)."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (320, 240), "red").save(tmp_path / "img" / "red.jpg")
    Image.new("RGB", (240, 320), "blue").save(tmp_path / "img" / "blue.jpg")
    rows, expected = [], {}
    for what, raw, usable in LINES:
        rows.append(raw)
        expected[len(rows)] = (what, usable)
        rows.append("   ")
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return tmp_path, path, expected


def write_meta(path: Path, **datasets) -> Path:
    path.write_text(json.dumps(datasets))
    return path


def validator_verdicts(path: Path, root: Path) -> dict[int, str]:
    report = validate_train_jsonl(path, root, show_progress=False)
    verdicts = {}
    for error in report.errors:
        where, why = error.split(": ", 1)
        verdicts[int(where.rsplit(":", 1)[1])] = why
    return verdicts


def test_every_reader_gives_a_line_the_same_verdict(annotation, tiny_tokenizer):
    root, path, expected = annotation
    raw_lines = path.read_bytes().splitlines()
    verdicts = {number: read_line(raw_lines[number - 1], root) for number in expected}
    screened = screen_annotation(path, root)
    screened_problems = dict(screened.problems)
    validator = validator_verdicts(path, root)
    encoder = ConversationTokenizer(tiny_tokenizer, "internlm2-chat", 64, 4096)
    meta = write_meta(root / "meta.json", table={"root": str(root), "annotation": str(path)})
    dataset = build_datasets(meta, encoder, image_size=224, max_dynamic_patch=2).datasets[0]
    trained = [number for number, _ in dataset.records]

    for number, (what, usable) in expected.items():
        verdict = verdicts[number]
        assert isinstance(verdict, ConversationLine) == usable, (what, verdict)
        assert (number in trained) == usable, what
        if usable:
            assert number not in screened_problems and number not in validator, what
        else:
            assert verdict and screened_problems[number] == verdict == validator[number], what
    # Blank lines are no sample and no mistake for any reader.
    assert set(screened_problems) | set(trained) == set(validator) | set(trained) == set(expected)
    assert screened.summary().startswith(f"{path}: {len(validator)} of {len(expected)} lines cannot be used")

    for index, number in enumerate(trained):  # what the screening keeps, the dataset builds
        item = dataset.build(index)
        assert (item["labels"] != IGNORE_INDEX).any(), expected[number][0]
        images = len(verdicts[number].images)
        context = tiny_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        assert (int((item["input_ids"] == context).sum()) > 0) == (images > 0), expected[number][0]


def test_the_verdicts_reasons(annotation):
    root, path, expected = annotation
    raw_lines = path.read_bytes().splitlines()
    reasons = {what: read_line(raw_lines[number - 1], root) for number, (what, _) in expected.items()}
    assert reasons["bad JSON"].startswith("not valid JSON")
    assert "alternate human/gpt" in reasons["non-alternating roles"]
    assert reasons["only an answer"] == "the conversation has no human turn"
    assert reasons["an empty answer"].startswith("an answer (gpt turn) is empty (the internlm2-chat template's")
    assert reasons["two images, one placeholder"].startswith("1 <image> placeholder(s) for 2 image(s)")
    assert reasons["a missing image file"] == f"image img/gone.jpg not found under {root}"
    system = reasons["a leading system turn, no placeholder"]
    assert system.turns == (("human", "Describe."), ("gpt", "Red.")) and system.images == ("img/red.jpg",)
    assert reasons["user/assistant roles"].turns == (("human", "Describe."), ("gpt", "Red."))
    assert reasons["a stated length"].length == 300
    assert read_line(b"  \n", root) == "empty line"


def test_an_image_that_does_not_decode_is_the_validators_extra_check(tmp_path, tiny_tokenizer):
    """The line verdict knows only that the file is there; opening it is the validator's (and loading's) business."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "broken.jpg").write_bytes(b"not a JPEG at all")
    path = tmp_path / "train.jsonl"
    path.write_text(conversation(*CAPTION, image="img/broken.jpg") + "\n")
    assert isinstance(read_line(path.read_bytes(), tmp_path), ConversationLine)
    assert not screen_annotation(path, tmp_path).problems
    report = validate_train_jsonl(path, tmp_path, show_progress=False)
    assert len(report.errors) == 1 and f"{path}:1: img/broken.jpg: image cannot be read" in report.errors[0]


def test_meta_entries_are_typed_and_resolved_against_the_data_root(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "train.jsonl").write_text(conversation(("human", "Hi."), ("gpt", "Hello.")) + "\n")
    meta = write_meta(
        tmp_path / "meta.json",
        coco={"root": "coco/", "annotation": "coco/train.jsonl", "repeat_time": 2, "max_dynamic_patch": 4},
    )
    assert load_meta(meta, tmp_path) == [
        MetaEntry("coco", tmp_path / "coco", tmp_path / "coco" / "train.jsonl", 2, False, 4, None)
    ]
    for bad, message in [
        ({"repeat_time": 1.5}, "repeat_time must be"),
        ({"repeat_time": 0}, "repeat_time must be"),
        ({"data_augment": "yes"}, "data_augment must be true or false"),
        ({"max_dynamic_patch": 0}, "max_dynamic_patch must be a whole number"),
        ({"annotation": "coco/train.json"}, "must be a .jsonl file"),
        ({"root": 3}, "has no 'root' path"),
    ]:
        write_meta(meta, coco={"root": "coco/", "annotation": "coco/train.jsonl", **bad})
        with pytest.raises(MetaError, match=rf"^{meta}: dataset 'coco'.*{message}"):
            load_meta(meta, tmp_path)
        # The validator applies the same rules, and goes on to the next entry.
        other = {"root": str(tmp_path / "coco"), "annotation": str(tmp_path / "coco" / "train.jsonl"), "length": 1}
        write_meta(meta, coco={"root": "coco/", "annotation": "coco/train.jsonl", **bad}, other=other)
        report = validate_meta(meta, show_progress=False, data_root=tmp_path)
        assert len(report.errors) == 1 and message in report.errors[0] and "other" in report.counts


def test_the_validator_command_resolves_the_meta_against_the_data_root(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    (data / "coco" / "img").mkdir(parents=True)
    Image.new("RGB", (64, 48), "red").save(data / "coco" / "img" / "red.jpg")
    (data / "coco" / "train.jsonl").write_text(conversation(*CAPTION, image="img/red.jpg") + "\n")
    meta = write_meta(tmp_path / "meta.json", coco={"root": "coco/", "annotation": "coco/train.jsonl", "length": 1})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert validate_data.main(["--meta", str(meta), "--data-root", str(data), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"coco: {data / 'coco' / 'train.jsonl'}: lines 1, unique images 1" in out and "OK" in out
    # Without it the same paths are looked for under the current folder, as the fine-tune does.
    assert validate_data.main(["--meta", str(meta), "--quiet"]) == 1
    assert f"annotation coco/train.jsonl does not exist (relative to {elsewhere})" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        validate_data.main(["--data-root", str(data)])


def test_one_ground_truth_for_the_evaluation_and_the_synthetic_set(tmp_path):
    from pycocotools.coco import COCO

    entries = [
        {"image": "val2014/COCO_val2014_000000000042.jpg", "image_id": 42, "captions": ["a cat.", "one cat."]},
        {"image": "val2014/COCO_val2014_000000000007.jpg", "image_id": 7, "captions": ["a dog."]},
    ]
    path = ground_truth_from_entries(entries, tmp_path / "gt.json")
    written = json.loads(path.read_text())
    assert written == coco_ground_truth([({"id": 42}, ["a cat.", "one cat."]), ({"id": 7}, ["a dog."])])
    assert [annotation["id"] for annotation in written["annotations"]] == [1, 2, 3]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
    assert [annotation["caption"] for annotation in gt.imgToAnns[42]] == ["a cat.", "one cat."]
    assert not list(tmp_path.glob("*.tmp"))


def test_the_karpathy_names_are_written_in_one_python_file():
    sources = [path for folder in ("internvl_chat", "tools") for path in sorted((REPO / folder).rglob("*.py"))]
    for name in (KARPATHY_TRAIN_JSONL, KARPATHY_TEST_JSON, KARPATHY_TEST_GT_JSON, "def image_id_from_name"):
        found = {str(path.relative_to(REPO)) for path in sources if name in path.read_text(encoding="utf-8")}
        assert found == {"internvl_chat/data/formats.py"}, (name, found)
