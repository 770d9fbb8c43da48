"""A page of an evaluation's captions: the pictures, their reference captions, each run's caption and its CIDEr,
sortable by the gain between the first and the last run; and the metric table as Markdown and as a chart.

  python tools/caption_report.py results/coco_BEFORE.json results/coco_AFTER.json --names before,after
  python tools/caption_report.py results/coco_241127153000.json --out results/coco_report

Each results file is what evaluate.sh writes (it prints this command after scoring). Writes OUT/index.html (open it
in a browser; the pictures are small copies in OUT/pictures/), OUT/metrics.md and OUT/metrics.png. Scoring needs
Java, as in the evaluation.
"""

import argparse
import html
import json
import sys
from pathlib import Path

from internvl_chat.eval.caption_sets import CAPTION_SETS, read_entries
from internvl_chat.eval.scoring import METRIC_NAMES, ScoringError, score_captions

THUMBNAIL = 320  # pixels, the longer side
SYNTHETIC_NOTE = (
    "These pictures are synthetic (<code>tools/make_synthetic_coco.py</code>): a flat background colour and one to "
    "four groups of shapes (circles, squares, triangles, stars), each group of one colour and size, in a corner or "
    "the centre of the picture. A correct caption names the shapes with their colour, number and size, where they "
    "are, and the background colour, as the reference captions do, for example <i>{example}</i> Under each picture, "
    "<b>drawn</b> says what is in it."
)


def score_runs(paths: list[Path], gt: Path) -> list[tuple[dict, dict]]:
    """(metrics, {image_id: CIDEr}) of each results file."""
    runs = []
    for path in paths:
        per_image: dict = {}
        runs.append((score_captions(path, gt, verbose=False, per_image=per_image), per_image))
    return runs


def markdown_table(names: list[str], runs: list[tuple[dict, dict]]) -> str:
    header = ["metric", *names] + (["change"] if len(runs) > 1 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in METRIC_NAMES:
        values = [metrics[metric] for metrics, _ in runs]
        cells = [f"{value:.3f}" for value in values] + ([f"{values[-1] - values[0]:+.3f}"] if len(runs) > 1 else [])
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(names: list[str], runs: list[tuple[dict, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(runs)
    for index, (name, (metrics, _)) in enumerate(zip(names, runs)):
        positions = [m + (index - (len(runs) - 1) / 2) * width for m in range(len(METRIC_NAMES))]
        axes.bar(positions, [metrics[metric] for metric in METRIC_NAMES], width, label=name)
    axes.set_xticks(range(len(METRIC_NAMES)), METRIC_NAMES, rotation=20)
    axes.set_ylabel("score")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def scene_text(scene: dict) -> str:
    """What was drawn in a synthetic picture, from the scene the generator recorded."""
    groups = []
    for group in scene["groups"]:
        words = [
            str(group["count"]),
            group.get("size") or "",
            group["color"],
            group["shape"] + "s" * (group["count"] > 1),
        ]
        groups.append(" ".join(word for word in words if word) + " at " + group["position"].replace("_", " "))
    return "; ".join(groups) + f"; {scene['background']} background"


def chosen_pictures(entries: list[dict], gains: dict, most: int) -> list[dict]:
    """Every picture when there are few; else the largest gains and the largest losses, half each."""
    if len(entries) <= most:
        return entries
    ranked = sorted(entries, key=lambda entry: gains[entry["image_id"]])
    return ranked[-(most - most // 2) :][::-1] + ranked[: most // 2]


def write_page(out: Path, names, runs, captions, entries, scenes, most: int) -> None:
    from PIL import Image

    first, last = runs[0][1], runs[-1][1]
    gains = {entry["image_id"]: last[entry["image_id"]] - first[entry["image_id"]] for entry in entries}
    pictures = out / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in chosen_pictures(entries, gains, most):
        image_id = entry["image_id"]
        with Image.open(entry["image"]) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            image.save(pictures / f"{image_id}.jpg", quality=85)
        references = "".join(f"<li>{html.escape(text)}</li>" for text in entry.get("captions") or [])
        drawn = f"<p class=drawn><b>drawn:</b> {html.escape(scene_text(scenes[image_id]))}</p>" if scenes else ""
        run_cells = "".join(
            f"<td>{html.escape(captions[index][image_id])}<br><span class=score>CIDEr "
            f"{per_image[image_id]:.2f}</span></td>"
            for index, (_, per_image) in enumerate(runs)
        )
        rows.append(
            f"<tr data-gain='{gains[image_id]:.6f}' data-last='{last[image_id]:.6f}' data-id='{image_id}'>"
            f"<td><img src='pictures/{image_id}.jpg'><br>{image_id}{drawn}</td><td><ul>{references}</ul></td>"
            f"{run_cells}<td class=gain>{gains[image_id]:+.2f}</td></tr>"
        )
    shown = len(rows)
    note = SYNTHETIC_NOTE.format(example=html.escape((entries[0].get("captions") or [""])[0])) if scenes else ""
    metric_rows = "".join(
        f"<tr><td>{metric}</td>" + "".join(f"<td>{metrics[metric]:.3f}</td>" for metrics, _ in runs) + "</tr>"
        for metric in METRIC_NAMES
    )
    columns = "".join(f"<th>{html.escape(name)}</th>" for name in names)
    style = (
        "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} td,th{border:1px solid #ccc;"
        "padding:6px;vertical-align:top} img{max-width:320px} .score{color:#666;font-size:90%} .drawn{color:#444;"
        "font-size:90%;max-width:320px} ul{margin:0;padding-left:1.2em} button{margin-right:6px}"
    )
    script = (
        "function sortBy(key,descending){const body=document.getElementById('pictures');"
        "[...body.rows].sort((a,b)=>(descending?-1:1)*(parseFloat(a.dataset[key])-parseFloat(b.dataset[key])))"
        ".forEach(row=>body.appendChild(row));}"
    )
    (out / "index.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>Captions</title><style>{style}</style><script>{script}</script>"
        f"<h1>Captions: {' vs '.join(html.escape(name) for name in names)}</h1>"
        f"<table><tr><th>metric</th>{columns}</tr>{metric_rows}</table><p><img src='metrics.png' "
        f"style='max-width:900px'></p><p>{note}</p>"
        f"<p>{shown} of {len(entries)} pictures{' (the largest gains and losses)' if shown < len(entries) else ''}. "
        f"Sort by <button onclick=\"sortBy('gain',true)\">gain</button>"
        f"<button onclick=\"sortBy('gain',false)\">loss</button>"
        f"<button onclick=\"sortBy('last',true)\">CIDEr of {html.escape(names[-1])}</button>"
        f"<button onclick=\"sortBy('id',false)\">picture</button></p>"
        f"<table><thead><tr><th>picture</th><th>references</th>{columns}<th>gain</th></tr></thead>"
        f"<tbody id=pictures>{''.join(rows)}</tbody></table>"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results files of evaluate.sh, the baseline first")
    parser.add_argument("--names", default=None, help="a name a run, comma-separated (default: the file names)")
    parser.add_argument("--set", default="coco", choices=sorted(CAPTION_SETS), help="the test set they caption")
    parser.add_argument("--data-root", default=None, help="folder holding data/ (default: the current folder)")
    parser.add_argument("--out", type=Path, default=None, help="default: the last results file's name + _report")
    parser.add_argument("--max-pictures", type=int, default=200, help="pictures on the page (default 200)")
    args = parser.parse_args(argv)
    names = args.names.split(",") if args.names else [path.stem for path in args.results]
    if len(names) != len(args.results):
        parser.error(f"--names gives {len(names)} names for {len(args.results)} results files")
    out = args.out or args.results[-1].with_name(args.results[-1].stem + "_report")
    try:
        entries, gt = read_entries(CAPTION_SETS[args.set], args.data_root)
        if gt is None:
            raise ScoringError(f"the {args.set} set has no ground-truth file to score against")
        runs = score_runs(args.results, gt)
    except (ScoringError, FileNotFoundError) as error:
        sys.exit(f"caption_report: {error}")
    captions = [
        {entry["image_id"]: entry["caption"] for entry in json.loads(path.read_text())} for path in args.results
    ]
    by_id = {entry["image_id"]: entry for entry in entries}
    if not all(entry.get("captions") for entry in entries):  # sets whose annotation has no references: the gt's
        for annotation in json.loads(gt.read_text())["annotations"]:
            by_id[int(annotation["image_id"])].setdefault("captions", []).append(annotation["caption"])
    root = Path(args.data_root or ".") / CAPTION_SETS[args.set].root
    scenes_file = root / "synthetic_scenes.json"
    scenes = (
        {scene["image_id"]: scene for scene in json.loads(scenes_file.read_text())["scenes"]}
        if scenes_file.is_file()
        else {}
    )
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(names, runs)
    (out / "metrics.md").write_text(table)
    chart(names, runs, out / "metrics.png")
    write_page(out, names, runs, captions, entries, scenes, args.max_pictures)
    print(table, end="")
    print(f"report: {out / 'index.html'}, {out / 'metrics.md'}, {out / 'metrics.png'}")


if __name__ == "__main__":
    main()
