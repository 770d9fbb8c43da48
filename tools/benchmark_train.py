#!/usr/bin/env python3
"""Training-step speed of the LoRA recipe, mode by mode, measured in the same run on the same batches.

  python tools/benchmark_train.py --like InternVL2-2B                  # the default modes, table + --json
  python tools/benchmark_train.py --like InternVL2-2B --same-captions --pictures 1 --lora-dropout 0 --steps 30
                                                                     # loss curves of the modes on the same data
  python tools/benchmark_train.py --model pretrained/InternVL2-tiny --device cpu --steps 2   # smoke test

Modes (combine with '+'):
  faithful           what the original computes: full-vocabulary logits at every position, gradient checkpointing
  supervised_logits  the LM head only where a label is supervised (--supervised_logits_only)
  no_checkpointing   keep activations instead of recomputing them (--grad_checkpoint False)
  shared_image       one sequence per picture with all its captions (--group_by_image); a step is --pictures pictures
  packed             a step's captions in one sequence without padding (--pack_samples): flash-attn's varlen kernel
                     where it imports, else flex attention with the block-diagonal mask (SDPA under it on a CPU)
  compile            torch.compile every ViT and LLM block (--compile_blocks); put it last: it is not undone
  flex               the LLM's attention through flex attention (causal, or the whole shared-image mask as a
                     BlockMask whose empty blocks are skipped); CUDA only: PyTorch has no flex attention backward on
                     the CPU
  sdpa               the LLM's attention through SDPA (for shared_image: under the dense mask)
  full_last_layer    with supervised_logits: the LLM's last layer at every row, not at the supervised rows only
                     (what that saves)
Without flex or sdpa the LLM's attention is the trainer's: flash attention where flash-attn imports, else SDPA;
for shared_image the prefix split (flash attention takes no block mask), as with --group_by_image: SDPA's causal
kernel up to the first caption's end, the other captions' rows under the mask (flex attention on a GPU).
Batches are COCO-shaped (synthetic 640x480 pictures: 7 tiles, ~1,850 tokens, ~12-word captions; with --coco-sizes
COCO's mix of picture shapes, 1 to 7 tiles, so that padded batches pad) through the real data pipeline, captions
drawn in a seeded random order as the Trainer's sampler would, prepared once and kept on the device, so the table
measures the model and not the loader. The
step is forward + backward + AdamW on the LoRA r128 adapters (on a GPU: bf16 weights, fp32 adapters under bf16
autocast; on a CPU: fp32). Every mode starts from the same adapters.

Each mode runs --warmup steps (compiling), --steps timed steps on batches it has not seen, then the same batches
again. The second pass is a long run's steady state, where the few distinct batch lengths recur: nothing is
built per shape any more (cuDNN execution plans, compiled graphs). The first pass also pays for those, and only
in the first mode that meets a shape (cuDNN's plans are shared by the process), so compare modes by the second.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch._dynamo.utils import counters as dynamo_counters  # noqa: E402

from internvl_chat.data.collator import (MASK_LENGTH_MULTIPLE, PAD_LENGTH_MULTIPLE, batch_counts,  # noqa: E402
                                         concat_pad_data_collator, packed_collator, shared_image_collator)
from internvl_chat.data.dataset import build_datasets  # noqa: E402
from internvl_chat.data.preprocess import ConversationTokenizer  # noqa: E402
from internvl_chat.model.conversation import IMG_CONTEXT_TOKEN  # noqa: E402
from internvl_chat.model.loader import load_model, load_tokenizer  # noqa: E402
from internvl_chat.model.modeling_internvl_chat import (block_mask_attention,  # noqa: E402
                                                         default_attn_implementation, packed_attention)
from internvl_chat.synthetic.checkpoint import build_checkpoint  # noqa: E402
from internvl_chat.synthetic.coco import make_synthetic_coco  # noqa: E402
from internvl_chat.train.flops import FlopModel, peak_tflops  # noqa: E402

KNOWN_MODES = {"faithful", "supervised_logits", "no_checkpointing", "shared_image", "packed", "compile", "flex",
               "sdpa", "full_last_layer"}


def prepare(args, work: Path):
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_dir = Path(args.model) if args.model else work / args.like
    if not args.model and not (model_dir / "config.json").exists():
        build_checkpoint(model_dir, like=args.like, dtype=dtype, device=args.device)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=dtype, device=device)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    for parameter in model.parameters():
        parameter.requires_grad = False
    model.wrap_llm_lora(r=128, lora_alpha=256, lora_dropout=args.lora_dropout)
    model.language_model.config.use_cache = False
    steps = args.steps + args.warmup
    images = max(max(args.batch, args.faithful_batch) * steps // 5 + 1, args.pictures * steps) + 1
    make_synthetic_coco(work / "coco", train_images=images, test_images=1, seed=0,
                        image_size=None if args.coco_sizes else (640, 480), meta_path=work / "meta.json", force=True)
    encoder = ConversationTokenizer(tokenizer, model.config.template, model.num_image_token, 4096)
    dataset = build_datasets(work / "meta.json", encoder, image_size=model.config.force_image_size,
                             max_dynamic_patch=6)
    groups = dataset.datasets[0].image_groups()
    step_groups = [[[dataset[i] for i in groups[step * args.pictures + p]] for p in range(args.pictures)]
                   for step in range(steps)]
    if args.same_captions:  # per-caption batches of exactly the captions of each shared step
        step_items = [[item for group in step for item in group] for step in step_groups]
        faithful_items = step_items
    else:  # the jsonl lists a picture's captions one after another; a random sampler mixes pictures
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
        step_items = [[dataset[order[step * args.batch + i]] for i in range(args.batch)] for step in range(steps)]
        faithful_items = [[dataset[order[step * args.faithful_batch + i]] for i in range(args.faithful_batch)]
                          for step in range(steps)]
    return model, {"per_caption": step_items, "faithful": faithful_items, "shared_image": step_groups}, device


def mode_batches(steps: dict, mode: set, device, length_multiple: int = MASK_LENGTH_MULTIPLE,
                 pad_multiple: int = PAD_LENGTH_MULTIPLE) -> list[dict]:
    """The mode's collated batches on the device (kept there, so the table measures the model, not the loader)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if "shared_image" in mode:
        batches = [shared_image_collator(step, length_multiple=length_multiple) for step in steps["shared_image"]]
    elif "faithful" in mode:  # padded as the original pads: to the longest sample
        batches = [concat_pad_data_collator(step) for step in steps["faithful"]]
    elif "packed" in mode:
        batches = [packed_collator(step) for step in steps["per_caption"]]
    else:  # as the trainer pads them by default (--pad_to_multiple_of)
        batches = [concat_pad_data_collator(step, length_multiple=pad_multiple) for step in steps["per_caption"]]
    return [{k: v.to(device, dtype) if k == "pixel_values" else v.to(device) if isinstance(v, torch.Tensor) else v
             for k, v in batch.items()} for batch in batches]


def run_mode(model, batches, device, mode: set, warmup: int, flop_model, peak, lr):
    try:
        return measure_mode(model, batches, device, mode, warmup, flop_model, peak, lr)
    except Exception as error:  # e.g. out of memory: report it and go on with the next mode
        row = {"mode": "+".join(sorted(mode)), "error": f"{type(error).__name__}: {str(error)[:300]}"}
        print(row, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row


def set_up_mode(model, device, mode: set, lr: float):
    """The model switched to a mode (compiled blocks, checkpointing on or off, the LLM's attention) and a fresh
    AdamW on its adapters."""
    llm = model.language_model
    requested = "flex_attention" if "flex" in mode else "sdpa" if "sdpa" in mode else None
    if "shared_image" in mode:
        attention = block_mask_attention(requested)
    elif "packed" in mode:
        attention = packed_attention(requested, device.type)
    else:
        attention = requested or default_attn_implementation()
    model.config.llm_config._attn_implementation = attention
    if "compile" in mode:
        # Each compiled mode starts without graphs, as in a training run of its own: its warm-up compiles what it
        # needs, and the compiles counted in its timed steps are its own.
        torch._dynamo.reset()
        model.compile_blocks()
    if "no_checkpointing" in mode:
        llm.gradient_checkpointing_disable()
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, fused=device.type == "cuda")


def train_step(model, batch, optimizer, device, mode: set) -> torch.Tensor:
    # bf16 autocast over fp32 adapters, as the Trainer's --bf16 (DeepSpeed's bf16 casts the adapters instead)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(**batch, logits_for_labels_only="supervised_logits" in mode).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure_mode(model, batches, device, mode: set, warmup: int, flop_model, peak, lr):
    set_up_start = time.perf_counter()
    optimizer = set_up_mode(model, device, mode, lr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.reset_accumulated_memory_stats()
    losses = [train_step(model, batch, optimizer, device, mode) for batch in batches[:warmup]]
    synchronize(device)
    warmup_seconds = time.perf_counter() - set_up_start  # compiling, cuDNN plans, allocator growth
    timed = batches[warmup:]
    samples, tokens, flops = step_work(timed, "supervised_logits" in mode, flop_model)
    graphs_before = dynamo_counters["stats"]["unique_graphs"]
    seconds = timed_pass(model, timed, optimizer, device, mode, losses)
    # A graph compiled inside the timed steps (a batch shape the warm-up did not cover) costs seconds, not
    # milliseconds, and would make the row measure the compiler: flag it.
    compiles = dynamo_counters["stats"]["unique_graphs"] - graphs_before
    if compiles:
        print(f"warning: {compiles} graph(s) compiled during the timed steps of {'+'.join(sorted(mode))}; "
              "raise --warmup", flush=True)
    # The same batches again: every batch shape has been seen, as in a long run where the few distinct lengths
    # recur, so per-shape costs (cuDNN execution plans, compiled graphs) are paid and no longer in the time.
    repeat_seconds = timed_pass(model, timed, optimizer, device, mode, losses)
    row = {"mode": "+".join(sorted(mode)), "captions_per_s": round(samples / seconds, 2),
           "repeat_captions_per_s": round(samples / repeat_seconds, 2),
           "tokens_per_s": round(tokens / seconds), "compiles_in_timed_steps": compiles,
           "warmup_s": round(warmup_seconds, 1), "tflops": round(flops / seconds / 1e12, 1),
           "mfu": round(flops / seconds / 1e12 / peak, 3) if peak else None,
           "repeat_tflops": round(flops / repeat_seconds / 1e12, 1),
           "repeat_mfu": round(flops / repeat_seconds / 1e12 / peak, 3) if peak else None,
           "losses": [round(value, 5) for value in torch.stack(losses).tolist()],
           **memory_stats(device)}
    print(row, flush=True)
    return row


def timed_pass(model, batches, optimizer, device, mode: set, losses: list) -> float:
    """Seconds for training steps over the batches. Losses stay on the device until the end, as in the Trainer,
    which reads them only when it logs: a read every step would make the host wait for each step's last kernel."""
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        losses.append(train_step(model, batch, optimizer, device, mode))
    synchronize(device)
    return time.perf_counter() - start


def step_work(batches, supervised_logits_only: bool, flop_model) -> tuple[int, int, float]:
    """Captions, tokens and model FLOPs of the batches (read before timing: they are host reads of GPU tensors)."""
    samples, tokens, flops = 0, 0, 0.0
    for batch in batches:
        counts = batch_counts(batch)
        positions = counts.supervised if supervised_logits_only else batch["input_ids"].numel()
        samples += counts.captions
        tokens += sum(counts.lengths)
        flops += flop_model.train_step_flops(int(batch["pixel_values"].shape[0]), counts.lengths, positions)
    return samples, tokens, flops


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_stats(device) -> dict:
    """Peak memory and the caching allocator's retries: a retry frees every cached block and waits for the GPU,
    so a step that needs them is many times slower than its kernels (then try
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True or a smaller batch)."""
    if device.type != "cuda":
        return {"peak_memory_gb": None}
    stats = torch.cuda.memory_stats()
    return {"peak_memory_gb": round(stats["allocated_bytes.all.peak"] / 2**30, 1),
            "peak_reserved_gb": round(stats["reserved_bytes.all.peak"] / 2**30, 1),
            "allocator_retries": stats["num_alloc_retries"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--like", default="InternVL2-2B", help="random weights with this model's shapes")
    parser.add_argument("--model", default=None, help="an existing checkpoint instead of --like")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=4, help="captions per step in the fast per-caption modes")
    parser.add_argument("--faithful-batch", type=int, default=4,
                        help="captions per step in the faithful mode (the tutorial's per-device 4)")
    parser.add_argument("--pictures", type=int, default=4, help="pictures per step in shared_image modes")
    parser.add_argument("--length-multiple", type=int, default=MASK_LENGTH_MULTIPLE,
                        help="shared_image sequences padded to a multiple of this (fewer distinct shapes when larger)")
    parser.add_argument("--pad-multiple", type=int, default=PAD_LENGTH_MULTIPLE,
                        help="padded per-caption batches (not faithful's) padded to a multiple of this, as the "
                             "trainer's --pad_to_multiple_of")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", default="faithful,supervised_logits,no_checkpointing,"
                                           "supervised_logits+no_checkpointing,"
                                           "supervised_logits+no_checkpointing+full_last_layer,"
                                           "shared_image+supervised_logits,"
                                           "shared_image+supervised_logits+no_checkpointing,"
                                           "packed+supervised_logits+no_checkpointing,"
                                           "supervised_logits+no_checkpointing+compile,"
                                           "shared_image+supervised_logits+no_checkpointing+compile")
    parser.add_argument("--lr", type=float, default=4e-5, help="AdamW learning rate (the tutorial's 4e-5)")
    parser.add_argument("--lora-dropout", type=float, default=0.05,
                        help="the tutorial's 0.05; 0 makes loss curves of different modes comparable step by step")
    parser.add_argument("--same-captions", action="store_true",
                        help="per-caption steps take exactly the captions of the shared_image steps "
                             "(--pictures x 5 captions), so every mode sees the same data and loss curves compare")
    parser.add_argument("--coco-sizes", action="store_true",
                        help="COCO's mix of picture shapes (1 to 7 tiles) instead of 640x480 only: padded batches pad")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    modes = [set(m.split("+")) for m in args.modes.split(",")]
    if args.length_multiple <= 0 or args.length_multiple % MASK_LENGTH_MULTIPLE:
        parser.error(f"--length-multiple must be a positive multiple of {MASK_LENGTH_MULTIPLE}")
    for mode in modes:
        unknown = mode - KNOWN_MODES
        if unknown:
            parser.error(f"unknown mode(s) {sorted(unknown)}; known: {sorted(KNOWN_MODES)}")
        if len(mode & {"faithful", "packed", "shared_image"}) > 1:
            parser.error(f"{'+'.join(sorted(mode))}: faithful, packed and shared_image batch differently; pick one")
    compiled = [index for index, mode in enumerate(modes) if "compile" in mode]
    if compiled and any("compile" not in mode for mode in modes[compiled[0]:]):
        parser.error("a mode without compile after a compiled one would still run compiled blocks (compile is not "
                     "undone): put the compiled modes last")
    with tempfile.TemporaryDirectory() as tmp:
        model, steps, device = prepare(args, Path(tmp))
        peak = peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
        initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        rows = []
        for mode in modes:
            with torch.no_grad():  # every mode starts from the same adapters
                for name, parameter in model.named_parameters():
                    if name in initial:
                        parameter.copy_(initial[name])
                        parameter.grad = None
            batches = mode_batches(steps, mode, device, args.length_multiple, args.pad_multiple)
            model.last_layer_at_supervised_rows = "full_last_layer" not in mode
            flop_model = FlopModel.from_config(model.config, lora_rank=128,
                                               last_layer_at_logits=model.llm_takes_output_rows())
            rows.append(run_mode(model, batches, device, mode, args.warmup, flop_model, peak, args.lr))
    baseline, repeat_baseline = rows[0].get("captions_per_s"), rows[0].get("repeat_captions_per_s")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{name}, {args.model or args.like}, a step: {args.faithful_batch} captions (faithful), {args.batch} "
          f"captions (other per-caption modes), {args.pictures} pictures (shared_image, lengths a multiple of "
          f"{args.length_multiple}), {args.steps} timed steps per mode, "
          f"{'COCO picture sizes' if args.coco_sizes else '640x480 pictures'}")
    print("| mode | captions/s | same batches again | tokens/s | model TFLOP/s (first pass, again) "
          "| MFU (first, again) | peak GB (reserved) | allocator retries | warm-up s "
          "| vs first row (first pass, again) | loss: first, last |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['mode']} | {row['error']} | | | | | | | | | |")
            continue
        ratio = (f"{row['captions_per_s'] / baseline:.2f}x, {row['repeat_captions_per_s'] / repeat_baseline:.2f}x"
                 if baseline else "")
        print(f"| {row['mode']} | {row['captions_per_s']} | {row['repeat_captions_per_s']} | {row['tokens_per_s']:,} "
              f"| {row['tflops']}, {row['repeat_tflops']} | {row['mfu']}, {row['repeat_mfu']} "
              f"| {row['peak_memory_gb']} ({row.get('peak_reserved_gb')}) | "
              f"{row.get('allocator_retries')} | {row['warmup_s']} | {ratio} | "
              f"{row['losses'][0]:.4f}, {row['losses'][-1]:.4f} |")
    if args.same_captions:
        reference = rows[0].get("losses")
        for row in rows[1:]:
            if reference and "losses" in row:
                gap = max(abs(a - b) for a, b in zip(reference, row["losses"]))
                print(f"largest loss difference from {rows[0]['mode']} over {len(reference)} steps: "
                      f"{row['mode']} {gap:.5f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
