"""The benchmark tools run end to end on a tiny model on the CPU (their GPU numbers are in docs/)."""

import json
import subprocess
import sys
from pathlib import Path

from internvl_chat.devkit.checkpoint import build_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_train_measures_every_mode(tmp_path):
    """On the same captions (--same-captions) every mode follows the faithful loss curve (fp32, no dropout): the
    modes differ in speed only."""
    model = build_checkpoint(tmp_path / "tiny", seed=0, image_size=224)
    # the fast modes uncompiled: compiling on the CPU costs a minute a mode, and the compiled blocks' loss and
    # gradients are tested in tests/test_train_fast_modes.py
    fast = "supervised_logits_only+no_grad_checkpoint"
    modes = f"faithful,supervised_logits_only,{fast},{fast}+group_by_image"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/benchmark_train.py"),
            "--model",
            str(model),
            "--device",
            "cpu",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch",
            "2",
            "--accumulation",
            "4",
            "--same-captions",
            "--lora-dropout",
            "0",
            "--lr",
            "1e-3",
            "--modes",
            modes,
            "--json",
            str(tmp_path / "rows.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [row["mode"] for row in rows] == [
        "faithful",
        "supervised_logits_only",
        "supervised_logits_only+no_grad_checkpoint",
        "supervised_logits_only+no_grad_checkpoint+group_by_image",
    ]
    assert [row["llm_attention"] for row in rows] == ["sdpa", "sdpa", "sdpa", "prefix_split"]
    assert all(
        row["captions_per_s"] > 0 and row["repeat_captions_per_s"] > 0 and row["tokens_per_s"] > 0 for row in rows
    )
    assert all(row["repeat_tflops"] >= 0 and row["repeat_mfu"] is None for row in rows)  # no peak known on a CPU
    faithful = rows[0]["losses"]
    assert len(faithful) == 5  # 1 warm-up, 2 timed, the same 2 again
    for row in rows[1:]:
        assert max(abs(a - b) for a, b in zip(row["losses"], faithful)) < 1e-4, row["mode"]
    assert "| faithful | sdpa |" in result.stdout


def test_benchmark_train_names_the_flags_it_knows():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/benchmark_train.py"),
            "--device",
            "cpu",
            "--modes",
            "faithful,supervised_logits",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "unknown flag(s) ['supervised_logits']" in result.stderr
    assert "supervised_logits_only" in result.stderr


def test_benchmark_loader_times_both_layouts():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/benchmark_loader.py"),
            "--pictures",
            "8",
            "--batches",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rates = {}
    for row in result.stdout.splitlines():
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if len(cells) == 3 and cells[1].replace(".", "").isdigit():
            rates[cells[0]] = (float(cells[1]), int(cells[2]))
    assert rates.keys() == {"per caption", "grouped by image"}
    assert all(rate > 0 for rate, _ in rates.values())
    assert rates["per caption"][1] == 8  # 2 batches of 4
    assert rates["grouped by image"][1] in (30, 35)  # 2 micro-batches of whole 5-caption pictures, about 16 each


def test_launcher_table_reads_throughput_and_gc_time_from_trainer_states(tmp_path):
    """tools/gpu/launcher_table.py: from --first on, profiled steps left out, the median rate, the all-steps rate
    (same captions every step: the harmonic mean) and the median GC time a step."""
    rates = {1: 0.2, 2: 10.0, 3: 20.0, 4: 10.0, 5: 20.0, 6: 0.5}  # step 6 profiled
    history = [
        {
            "step": step,
            "samples_per_second": rate,
            "loss": 12.0 - step,
            "tflops_per_device": 100.0 * rate,
            "python_gc_ms": 2.0 * step,
            "max_memory_allocated_gb": 28.0,
        }
        for step, rate in rates.items()
    ]
    state = tmp_path / "per_caption_trainer_state.json"
    state.write_text(json.dumps({"log_history": history + [{"step": 6, "train_runtime": 9.0}]}))
    result = subprocess.run(
        [sys.executable, str(REPO / "tools/gpu/launcher_table.py"), str(state), "--skip", "6"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| per_caption |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:6] == ["3-5 (3)", "20.00", "10.00-20.00", "15.00", "2000.0"]  # 3 / (1/20 + 1/10 + 1/20) = 15
    assert cells[7] == "8.0 (max 10.0)" and cells[8] == "11.000 -> 6.000"
    # a run stopped before trainer_state.json: the same figures from its training log's printed dicts
    log = tmp_path / "stopped_training_log.txt"
    printed = [
        {"loss": str(entry["loss"]), **{key: str(value) for key, value in entry.items() if key not in ("step", "loss")}}
        for entry in history
    ]  # loss first
    log.write_text(
        "".join(f"{step}/6 [00:01<00:02] {entry}\n[Rank 0] time (ms)\n" for step, entry in enumerate(printed, 1))
    )
    result = subprocess.run(
        [sys.executable, str(REPO / "tools/gpu/launcher_table.py"), str(log), "--last", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| stopped |"))
    assert [cell.strip() for cell in row.strip("|").split("|")][1:5] == ["3-5 (3)", "20.00", "10.00-20.00", "15.00"]
