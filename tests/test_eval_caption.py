"""evaluate.sh under dash: batched and distributed captioning give exactly the captions of the original
one-image-at-a-time path (fp32, greedy), and scoring equals pycocoevalcap's COCOEvalCap."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from internvl_chat.data.formats import ANNOTATIONS_FOLDER, KARPATHY_TEST_GT_JSON, KARPATHY_TEST_JSON
from internvl_chat.devkit.checkpoint import build_checkpoint
from internvl_chat.devkit.coco import make_synthetic_coco
from internvl_chat.eval.scoring import ScoringError, score_captions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    # language-pretrained, so captions are varied text that ends with <|im_end|>, not random tokens
    build_checkpoint(root / "pretrained/InternVL2-tiny", seed=1, pretrain_steps=80, image_size=224)
    make_synthetic_coco(root / "data/coco", train_images=2, test_images=9, seed=3)
    return root


def evaluate(world, gpus, *options):
    out = world / f"results_gpus{gpus}_{'_'.join(o.strip('-') for o in options)}"
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_PORT", "GPUS")}  # a free port
    if gpus is not None:
        env["GPUS"] = str(gpus)
    result = subprocess.run(
        [
            "sh",
            str(REPO / "evaluate.sh"),
            "pretrained/InternVL2-tiny",
            "caption-coco",
            "--dynamic",
            "--out-dir",
            str(out),
            *options,
        ],
        cwd=world,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = [p for p in out.glob("coco_*.json")]
    assert len(results) == 1
    return json.loads(results[0].read_text()), result.stdout, out


@pytest.fixture(scope="module")
def one_by_one(world):
    """The original's path: chat() one image at a time through generate(). No GPUS: on a machine without a GPU
    that is one process."""
    return evaluate(world, None, "--engine", "hf", "--batch-size", "1")


def test_metric_block_and_files(world, one_by_one):
    results, stdout, out = one_by_one
    expected_ids = [
        int(e["image"].split("_")[-1][:-4])
        for e in json.loads((world / "data/coco" / ANNOTATIONS_FOLDER / KARPATHY_TEST_JSON).read_text())
    ]
    assert [r["image_id"] for r in results] == expected_ids  # dataset order
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert f"{name}: " in stdout
    assert "average caption length" in stdout
    assert "captioning on the CPU with 1 process(es)" in stdout and "1 process(es), hf engine" in stdout
    summary = (out / "pretrained_InternVL2-tiny.txt").read_text().splitlines()
    checkpoint, dataset, _, metrics = json.loads(summary[-1])
    assert (checkpoint, dataset) == ("pretrained/InternVL2-tiny", "coco") and "CIDEr" in metrics


def test_batch_8_gives_the_captions_of_batch_1(world, one_by_one):
    batched, _, _ = evaluate(world, 1, "--engine", "hf", "--batch-size", "8")
    assert batched == one_by_one[0]
    assert len({r["caption"] for r in batched}) > 1  # the images really get different captions


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fast_engine_gives_the_captions_of_batch_1(world, one_by_one, attention):
    """The decoding step attends to the whole static cache under a mask of the filled positions: with the fast
    GQA kernel (sdpa configured) and with transformers' eager attention (the reference maths)."""
    fast, stdout, _ = evaluate(world, 1, "--engine", "fast", "--batch-size", "4", "--attn-implementation", attention)
    llm = "eager" if attention == "eager" else "internvl_fast_decode"
    assert f"attention: ViT {attention}, LLM {llm};" in stdout and "fast engine" in stdout
    assert fast == one_by_one[0]


def test_the_fast_captioner_in_process_gives_the_captions_of_chat(world, one_by_one):
    """Through the library as the entry point calls it: the fast engine batches the shard by tile count, and
    generate_captions returns the captions of the original path's chat() (the evaluate.sh run above) in dataset
    order."""
    import torch

    from internvl_chat.checkpoint.loader import load_model, load_tokenizer
    from internvl_chat.eval.caption_data import CaptionImages
    from internvl_chat.eval.caption_sets import CAPTION_SETS, read_entries
    from internvl_chat.eval.captioner import build_captioner, choose_engine
    from internvl_chat.eval.fast_captioner import fast_engine_attention
    from internvl_chat.eval.generation import generate_captions

    checkpoint = world / "pretrained/InternVL2-tiny"
    model = load_model(checkpoint, dtype=torch.float32, device="cpu", attn_implementation=fast_engine_attention(None))
    choice = choose_engine(model.config, "auto", 1, 0.0, True, 4)
    assert choice.engine == "fast"
    entries, _ = read_entries(CAPTION_SETS["coco"], str(world))
    dataset = CaptionImages.for_model(entries, model.config, dynamic=True, max_dynamic_patch=6)
    captioner = build_captioner(choice, model, load_tokenizer(checkpoint), 30, 8)
    shard = list(range(len(dataset)))
    counts = dataset.tile_counts()
    batches = captioner.batches(dataset, shard)
    assert sorted(index for batch in batches for index in batch) == shard
    assert all(len({counts[index] for index in batch}) == 1 and len(batch) <= 4 for batch in batches)
    assert len(set(counts)) > 1  # so the batches take the pictures out of dataset order
    ids, captions, _, _ = generate_captions(dataset, captioner, shard, torch.device("cpu"), torch.float32, 0)
    assert [{"image_id": i, "caption": c} for i, c in zip(ids, captions)] == one_by_one[0]


def test_two_processes_give_the_results_of_one(world, one_by_one):
    sharded, stdout, _ = evaluate(world, 2, "--batch-size", "3")  # the default engine: fast
    assert sharded == one_by_one[0]
    assert "2 process(es)" in stdout


def test_scores_equal_cocoevalcap(world, one_by_one, tmp_path, monkeypatch):
    from pycocoevalcap import eval as cocoeval
    from pycocotools.coco import COCO

    results, _, out = one_by_one
    results_file = next(out.glob("coco_*.json"))
    gt_file = world / "data/coco" / ANNOTATIONS_FOLDER / KARPATHY_TEST_GT_JSON
    ours = score_captions(results_file, gt_file, verbose=False)

    class NoSpice:  # SPICE downloads CoreNLP when constructed; the other scorers are COCOEvalCap's own
        def compute_score(self, gts, res):
            return 0.0, []

        def method(self):
            return "SPICE"

    monkeypatch.setattr(cocoeval, "Spice", NoSpice)
    coco = COCO(str(gt_file))
    reference = cocoeval.COCOEvalCap(coco, coco.loadRes(str(results_file)))
    reference.evaluate()
    assert {k: v for k, v in reference.eval.items() if k != "SPICE"} == pytest.approx(ours, abs=1e-12)

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(results[:-1]))
    with pytest.raises(ScoringError, match="1 ground-truth images have no caption"):
        score_captions(partial, gt_file, verbose=False)
    doubled = tmp_path / "doubled.json"
    doubled.write_text(json.dumps(results + results[:1]))
    with pytest.raises(ScoringError, match="several captions"):
        score_captions(doubled, gt_file, verbose=False)


def test_missing_java_stops_before_generation(world):
    env = dict(os.environ, PATH="/nonexistent")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "internvl_chat/cli/evaluate.py"),
            "--checkpoint",
            "pretrained/InternVL2-tiny",
            "--datasets",
            "coco",
            "--dynamic",
        ],
        cwd=world,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "no `java` is on PATH" in result.stderr and "tools/score_captions.py" in result.stderr
    assert "loaded" not in result.stdout  # stopped before loading the model


def test_score_captions_tool(world, one_by_one):
    _, _, out = one_by_one
    results_file = next(out.glob("coco_*.json"))
    gt_file = world / "data/coco" / ANNOTATIONS_FOLDER / KARPATHY_TEST_GT_JSON
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/score_captions.py"),
            str(results_file),
            str(gt_file),
            "--json",
            str(out / "metrics.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metrics.json").read_text()) == score_captions(results_file, gt_file, verbose=False)
    assert "CIDEr: " in result.stdout


def test_batches_are_split_into_chunks_for_the_workers():
    from internvl_chat.eval.caption_data import split_into_chunks

    chunks = split_into_chunks([list(range(10)), [10, 11]], parts=4)
    assert chunks == [[[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]], [[10], [11]]]
    assert split_into_chunks([[1, 2, 3]], parts=0) == [[[1, 2, 3]]]


def test_caption_report_compares_runs_picture_by_picture(world, one_by_one, tmp_path):
    """tools/caption_report.py (the command evaluate.sh prints): the page shows every picture (a small copy beside
    it), its references, each run's caption with its CIDEr, and the gain; the metric table as Markdown and PNG."""
    import re
    from html.parser import HTMLParser

    results, stdout, out = one_by_one
    first = next(out.glob("coco_*.json"))
    assert f"a page of the captions: python tools/caption_report.py {first} --set coco" in stdout
    # a second run that captions every picture with its first reference: CIDEr must rise
    references = {
        e["image_id"]: e["caption"]
        for e in json.loads((world / "data/coco" / ANNOTATIONS_FOLDER / KARPATHY_TEST_GT_JSON).read_text())[
            "annotations"
        ]
    }
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps([{"image_id": r["image_id"], "caption": references[r["image_id"]]} for r in results]))
    report = tmp_path / "report"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/caption_report.py"),
            str(first),
            str(perfect),
            "--names",
            "model,references",
            "--out",
            str(report),
        ],
        cwd=world,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (report / "metrics.md").read_text()
    assert table.startswith("| metric | model | references | change |") and "| CIDEr |" in table
    assert (report / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.rows = [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "img":
                self.images.append(attrs["src"])
            if tag == "tr" and "data-gain" in attrs:
                self.rows.append(attrs)

    page = Page()
    text = (report / "index.html").read_text()
    page.feed(text)
    assert len(page.rows) == len(results) == 9
    assert all(float(row["data-gain"]) >= 0 for row in page.rows)  # the references score at least as well
    assert all((report / src).is_file() for src in page.images) and len(page.images) == 9 + 1  # + the chart
    assert "These pictures are synthetic" in text and "drawn:" in text
    assert len(re.findall(r"CIDEr \d", text)) == 2 * 9  # each run's caption of each picture, with its score
