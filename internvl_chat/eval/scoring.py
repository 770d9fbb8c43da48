"""COCO caption metrics with pycocoevalcap's own scorers: PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr
(and SPICE on request).

`COCOEvalCap.evaluate()` builds the SPICE scorer first, which downloads Stanford CoreNLP and so fails offline
before any metric is computed; this module runs the same scorers in the same order without it, printing the
same lines, and refuses results that do not cover every ground-truth image exactly once.
"""

import contextlib
import io
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

from ..data.formats import ANNOTATIONS_FOLDER, KARPATHY_TEST_GT_JSON


class ScoringError(ValueError):
    """Results and ground truth that cannot be scored together; the message says why."""


METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise ScoringError(
            "METEOR and the PTB tokenizer run on Java, and no `java` is on PATH: install a JRE "
            "(e.g. apt-get install default-jre-headless), or generate with --skip-scoring and score "
            "the results elsewhere with tools/score_captions.py RESULTS GT"
        )
    return java


@contextlib.contextmanager
def silenced(quiet: bool):
    """The process's own output descriptors pointed at /dev/null: pycocoevalcap prints from Python (BLEU's counts)
    and from its Java tokenizer, which writes to the inherited descriptor."""
    if not quiet:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in saved:
            os.close(descriptor)


def read_json(path: str | Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise ScoringError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ScoringError(f"{what} {path} is not valid JSON ({error})") from None


def read_results(path: str | Path) -> list[dict]:
    """A results file as the evaluation writes it: a JSON list of {"image_id": int, "caption": str}."""
    results = read_json(path, "results file")
    if not isinstance(results, list):
        raise ScoringError(
            f'results file {path} must be a JSON list of {{"image_id": ..., "caption": ...}}, '
            f"not a {type(results).__name__}"
        )
    for index, entry in enumerate(results):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("caption"), str)
            and isinstance(entry.get("image_id"), int)
            and not isinstance(entry.get("image_id"), bool)
        ):
            raise ScoringError(
                f"results file {path}: entry {index} is {json.dumps(entry)[:120]}; each entry must "
                'be {"image_id": <int>, "caption": <text>}'
            )
    return results


def read_ground_truth_ids(path: str | Path) -> set[int]:
    """The image ids of a COCO-format caption ground truth ({"images": [...], "annotations": [...]})."""
    ground_truth = read_json(path, "ground truth")
    if not (
        isinstance(ground_truth, dict)
        and isinstance(ground_truth.get("images"), list)
        and isinstance(ground_truth.get("annotations"), list)
    ):
        raise ScoringError(
            f"ground truth {path} must be COCO caption format: an object with 'images' and "
            f"'annotations' lists (e.g. data/coco/{ANNOTATIONS_FOLDER}/{KARPATHY_TEST_GT_JSON})"
        )
    try:
        return {int(image["id"]) for image in ground_truth["images"]}
    except (KeyError, TypeError, ValueError):
        raise ScoringError(f"ground truth {path}: every entry of 'images' needs an integer 'id'") from None


def check_coverage(results: list[dict], gt_image_ids: set[int], results_name: str) -> None:
    counts = Counter(int(entry["image_id"]) for entry in results)
    duplicates = sorted(image_id for image_id, count in counts.items() if count > 1)
    if duplicates:
        raise ScoringError(f"{results_name}: {len(duplicates)} image ids have several captions, e.g. {duplicates[:5]}")
    unknown = sorted(set(counts) - gt_image_ids)
    if unknown:
        raise ScoringError(f"{results_name}: {len(unknown)} image ids are not in the ground truth, e.g. {unknown[:5]}")
    missing = sorted(gt_image_ids - set(counts))
    if missing:
        raise ScoringError(f"{results_name}: {len(missing)} ground-truth images have no caption, e.g. {missing[:5]}")


def score_captions(
    results_file: str | Path,
    gt_file: str | Path,
    spice: bool = False,
    verbose: bool = True,
    per_image: dict | None = None,
) -> dict[str, float]:
    """Score a results json ([{image_id, caption}]) against a COCO-format ground-truth json. A dict given as
    per_image receives each image's CIDEr ({image_id: score}), CIDEr's own per-image scores."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    results = read_results(results_file)
    check_coverage(results, read_ground_truth_ids(gt_file), str(results_file))
    require_java()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' "loading annotations..." lines
        coco = COCO(str(gt_file))
        coco_results = coco.loadRes(str(results_file))
    image_ids = coco_results.getImgIds()
    log = print if verbose else (lambda *args, **kwargs: None)

    with silenced(not verbose):
        log("tokenization...")
        tokenizer = PTBTokenizer()
        references = tokenizer.tokenize({i: coco.imgToAnns[i] for i in image_ids})
        candidates = tokenizer.tokenize({i: coco_results.imgToAnns[i] for i in image_ids})

        log("setting up scorers...")
        scorers = [
            (Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
            (Meteor(), "METEOR"),
            (Rouge(), "ROUGE_L"),
            (Cider(), "CIDEr"),
        ]
        if spice:
            from pycocoevalcap.spice.spice import Spice

            scorers.append((Spice(), "SPICE"))
        metrics = {}
        for scorer, names in scorers:
            log(f"computing {scorer.method()} score...")
            score, scores = scorer.compute_score(references, candidates)
            for name, value in zip(names, score) if isinstance(names, list) else [(names, score)]:
                metrics[name] = float(value)
                log(f"{name}: {value:0.3f}")
            if names == "CIDEr" and per_image is not None:  # in the order of the references' keys
                per_image.update(zip(references, (float(value) for value in scores)))
    return metrics
