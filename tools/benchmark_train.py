#!/usr/bin/env python3
"""Training-step speed of the LoRA recipe, mode by mode, measured in the same run on the same captions.

  python tools/benchmark_train.py --like InternVL2-2B                  # the three recommended modes, a table
  python tools/benchmark_train.py --like InternVL2-2B --same-captions --lora-dropout 0 --steps 30
                                                                     # loss curves of the modes on the same data
  python tools/benchmark_train.py --model pretrained/InternVL2-tiny --device cpu --steps 2   # smoke test

A mode is the trainer's fast-mode flags joined with '+', each named as its flag:
  faithful                what the original computes (no flag): full-vocabulary logits at every position,
                          gradient checkpointing, one sequence per caption
  supervised_logits_only  --supervised_logits_only True: the LM head (and the LLM's last layer) only at the
                          supervised positions
  no_grad_checkpoint      --grad_checkpoint False: keep activations instead of recomputing them
  compile_blocks          --compile_blocks True: torch.compile every ViT and LLM block
  group_by_image          --group_by_image True: one sequence per picture with all its captions; a step holds the
                          same captions in micro-batches of whole pictures
The recommended modes are `fast` (supervised_logits_only+no_grad_checkpoint+compile_blocks) and `fast_grouped`
(the same + group_by_image); both names are accepted.

Every mode goes through the trainer's own pieces: the model set up by train/model_setup.py (LoRA r128 on the LLM,
everything else frozen, loaded with the layout's attention), batches made by the BatchLayout's collator and handed
to the model by its model_inputs(), as InternVLTrainer does. Each mode loads the model afresh with the same LoRA
initialisation. Batches are COCO-shaped (synthetic 640x480 pictures: 7 tiles, ~1,850 tokens, ~12-word captions;
--coco-sizes: COCO's mix of picture shapes, 1 to 7 tiles), collated on the CPU before timing and kept on the device,
so the table measures the model and not the loader. A step is forward + backward + AdamW (on a GPU: bf16 weights,
fp32 adapters under bf16 autocast; on a CPU: fp32).

Each mode runs --warmup steps (compiling), --steps timed steps on batches it has not seen, then the same batches
again. The second pass is a long run's steady state, where the few distinct batch lengths recur and nothing is
built per shape any more (cuDNN execution plans, compiled graphs): compare modes by it.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters as dynamo_counters

from internvl_chat.devkit.checkpoint import build_checkpoint
from internvl_chat.devkit.train_benchmark import (
    DEFAULT_MODES,
    device_steps,
    mode_name,
    parse_mode,
    prepare_data,
    set_up,
    synchronize,
    timed_pass,
    train_step,
)
from internvl_chat.train.flops import FlopModel, peak_tflops


def measure_mode(model_dir, flags, steps, args, device, peak) -> dict:
    started = time.perf_counter()
    model, layout, optimizer = set_up(model_dir, flags, args, device)
    batches = device_steps(layout, steps["grouped" if layout.group_by_image else "per_caption"], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = [train_step(model, layout, batch, optimizer, device) for batch in batches[: args.warmup]]
    synchronize(device)
    warmup_seconds = time.perf_counter() - started  # loading, compiling, cuDNN plans, allocator growth
    timed = batches[args.warmup :]
    flop_model = FlopModel.from_config(
        model.config, lora_rank=128, last_layer_at_logits=layout.computes_last_layer_at_rows(model)
    )
    captions, tokens, flops = step_work(timed, layout, flop_model)
    graphs_before = dynamo_counters["stats"]["unique_graphs"]
    seconds = timed_pass(model, layout, timed, optimizer, device, losses)
    compiles = dynamo_counters["stats"]["unique_graphs"] - graphs_before
    if compiles:  # a graph compiled inside the timed steps costs seconds: the row would measure the compiler
        print(
            f"warning: {compiles} graph(s) compiled during the timed steps of {mode_name(flags)}; raise --warmup",
            flush=True,
        )
    repeat_seconds = timed_pass(model, layout, timed, optimizer, device, losses)
    row = {
        "mode": mode_name(flags),
        "llm_attention": model.config.llm_config._attn_implementation,
        "captions_per_s": round(captions / seconds, 2),
        "repeat_captions_per_s": round(captions / repeat_seconds, 2),
        "tokens_per_s": round(tokens / repeat_seconds),
        "compiles_in_timed_steps": compiles,
        "warmup_s": round(warmup_seconds, 1),
        "repeat_tflops": round(flops / repeat_seconds / 1e12, 1),
        "repeat_mfu": round(flops / repeat_seconds / 1e12 / peak, 3) if peak else None,
        "losses": [round(value, 5) for value in torch.stack(losses).tolist()],
        **memory_stats(device),
    }
    print(row, flush=True)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def step_work(steps, layout, flop_model) -> tuple[int, int, float]:
    """Captions, tokens and model FLOPs of the steps, from the collator's counts (as the Trainer logs them)."""
    batches = [batch for step in steps for batch in step]
    captions = sum(batch.counts.captions for batch in batches)
    tokens = sum(sum(batch.counts.lengths) for batch in batches)
    return captions, tokens, sum(flop_model.batch_flops(batch, layout.uses_loss_rows) for batch in batches)


def memory_stats(device) -> dict:
    if device.type != "cuda":
        return {"peak_memory_gb": None}
    stats = torch.cuda.memory_stats()
    return {
        "peak_memory_gb": round(stats["allocated_bytes.all.peak"] / 2**30, 1),
        "allocator_retries": stats["num_alloc_retries"],
    }


def print_table(rows: list[dict], args, device_name: str) -> None:
    print(
        f"\n{device_name}, {args.model or args.like}: a step is {args.accumulation} micro-batches of {args.batch} "
        f"captions, or about as many captions in whole pictures grouped by image; {args.steps} timed steps a mode, "
        f"{'COCO picture sizes' if args.coco_sizes else '640x480 pictures'}"
    )
    print(
        "| mode | LLM attention | captions/s | first sight | tokens/s | model TFLOP/s | MFU | peak GB "
        "| warm-up s | vs first row | loss: first, last |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    baseline = rows[0].get("repeat_captions_per_s")
    for row in rows:
        if "error" in row:
            print(f"| {row['mode']} | {row['error']} |" + " |" * 9)
            continue
        ratio = f"{row['repeat_captions_per_s'] / baseline:.2f}x" if baseline else ""
        print(
            f"| {row['mode']} | {row['llm_attention']} | {row['repeat_captions_per_s']} | {row['captions_per_s']} "
            f"| {row['tokens_per_s']:,} | {row['repeat_tflops']} | {row['repeat_mfu']} | {row['peak_memory_gb']} "
            f"| {row['warmup_s']} | {ratio} | {row['losses'][0]:.4f}, {row['losses'][-1]:.4f} |"
        )
    if args.same_captions:
        reference = rows[0].get("losses")
        for row in rows[1:]:
            if reference and "losses" in row:
                gap = max(abs(a - b) for a, b in zip(reference, row["losses"]))
                print(
                    f"largest loss difference from {rows[0]['mode']} over {len(reference)} steps: "
                    f"{row['mode']} {gap:.5f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--like", default="InternVL2-2B", help="random weights with this model's shapes")
    parser.add_argument("--model", default=None, help="an existing checkpoint instead of --like")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--batch",
        type=int,
        default=4,
        help="captions a micro-batch, the launcher's PER_DEVICE_BATCH_SIZE (the tutorial's 4)",
    )
    parser.add_argument(
        "--accumulation",
        type=int,
        default=4,
        help="micro-batches a step per caption (a step: --batch x --accumulation captions; 16 is the "
        "launcher's step on one GPU with BATCH_SIZE 16); grouped by image, the same captions in "
        "micro-batches of whole pictures",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps a mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--modes", default=DEFAULT_MODES, help=f"comma-separated modes (default {DEFAULT_MODES}); see above"
    )
    parser.add_argument(
        "--attn-implementation",
        default=None,
        help="as the trainer's --attn_implementation (default: the trainer's choice per mode)",
    )
    parser.add_argument("--lr", type=float, default=4e-5, help="AdamW learning rate (the tutorial's 4e-5)")
    parser.add_argument(
        "--lora-dropout",
        type=float,
        default=0.05,
        help="the tutorial's 0.05; 0 makes loss curves of different modes comparable step by step",
    )
    parser.add_argument(
        "--same-captions",
        action="store_true",
        help="per-caption steps take exactly the captions of the grouped steps, so that every mode "
        "sees the same data and the loss curves compare",
    )
    parser.add_argument(
        "--coco-sizes", action="store_true", help="COCO's mix of picture shapes (1 to 7 tiles) instead of 640x480 only"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    try:
        modes = [parse_mode(text) for text in args.modes.split(",")]
    except ValueError as error:
        parser.error(str(error))
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = Path(args.model) if args.model else work / args.like
        if not args.model:
            build_checkpoint(
                model_dir,
                like=args.like,
                dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                device=args.device,
            )
        steps = prepare_data(args, model_dir, work)
        peak = peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
        rows = []
        for flags in modes:
            try:
                rows.append(measure_mode(model_dir, flags, steps, args, device, peak))
            except Exception as error:  # e.g. out of memory: report it and go on with the next mode
                rows.append({"mode": mode_name(flags), "error": f"{type(error).__name__}: {str(error)[:300]}"})
                print(rows[-1], flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print_table(rows, args, device_name)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
