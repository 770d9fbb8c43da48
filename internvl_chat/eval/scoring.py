"""COCO caption metrics with pycocoevalcap's own scorers: PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr
(and SPICE on request).

`COCOEvalCap.evaluate()` builds the SPICE scorer first, which downloads Stanford CoreNLP and so fails offline
before any metric is computed; this module runs the same scorers in the same order without it, printing the
same lines, and refuses results that do not cover every ground-truth image exactly once.
"""

import json
import shutil
from pathlib import Path


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


def check_coverage(results: list[dict], gt_image_ids: set[int], results_name: str) -> None:
    ids = [int(entry["image_id"]) for entry in results]
    duplicates = sorted({i for i in ids if ids.count(i) > 1}) if len(ids) != len(set(ids)) else []
    if duplicates:
        raise ScoringError(f"{results_name}: {len(duplicates)} image ids have several captions, e.g. {duplicates[:5]}")
    unknown = sorted(set(ids) - gt_image_ids)
    if unknown:
        raise ScoringError(f"{results_name}: {len(unknown)} image ids are not in the ground truth, e.g. {unknown[:5]}")
    missing = sorted(gt_image_ids - set(ids))
    if missing:
        raise ScoringError(f"{results_name}: {len(missing)} ground-truth images have no caption, e.g. {missing[:5]}")


def score_captions(
    results_file: str | Path, gt_file: str | Path, spice: bool = False, verbose: bool = True
) -> dict[str, float]:
    """Score a results json ([{image_id, caption}]) against a COCO-format ground-truth json."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    require_java()
    results = json.loads(Path(results_file).read_text())
    coco = COCO(str(gt_file))
    check_coverage(results, set(coco.getImgIds()), str(results_file))
    coco_results = coco.loadRes(str(results_file))
    image_ids = coco_results.getImgIds()
    log = print if verbose else (lambda *args, **kwargs: None)

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
        score, _ = scorer.compute_score(references, candidates)
        for name, value in zip(names, score) if isinstance(names, list) else [(names, score)]:
            metrics[name] = float(value)
            log(f"{name}: {value:0.3f}")
    return metrics
