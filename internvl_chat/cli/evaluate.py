"""Caption generation and COCO scoring: the torchrun target of evaluate.sh.

  torchrun --nproc_per_node=4 internvl_chat/cli/evaluate.py --checkpoint pretrained/InternVL2-2B \
      --datasets coco --dynamic [--batch-size 16]

Each rank captions a contiguous block of the test set (greedy, 8 to 30 new tokens, the original prompt), rank 0
gathers the captions in dataset order, writes results/<set>_<time>.json, scores it with pycocoevalcap's scorers
and appends a line to results/<checkpoint>.txt. Plain and unmerged-LoRA checkpoints load alike.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from internvl_chat.checkpoint.folder import CheckpointError
from internvl_chat.checkpoint.loader import load_model, load_tokenizer
from internvl_chat.cli.evaluate_arguments import input_problems, parse_args, print_problems
from internvl_chat.data.transforms import ImageError
from internvl_chat.eval.caption_data import CaptionImages, ContiguousShardSampler
from internvl_chat.eval.caption_sets import CAPTION_SETS, ground_truth_from_entries, read_entries
from internvl_chat.eval.captioner import EngineChoice, EngineError, build_captioner, choose_engine
from internvl_chat.eval.fast_captioner import fast_engine_attention
from internvl_chat.eval.generation import generate_captions
from internvl_chat.eval.inputs import user_error_line
from internvl_chat.eval.scoring import ScoringError, score_captions
from internvl_chat.model.configuration_internvl_chat import InternVLChatConfig

# The library's errors that a user's inputs cause, found after the checks: one line, no traceback. ImageError: a
# picture that does not decode, found while captioning.
USER_ERRORS = (ScoringError, FileNotFoundError, CheckpointError, ImageError, EngineError)


def refuse(problems: list[str]) -> None:
    rank = os.environ.get("RANK")
    print_problems(f"internvl-evaluate (process {rank})" if rank else "internvl-evaluate", problems)
    sys.exit(2)


def init_distributed() -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world_size > 1 else 0), world_size, device


def load(args, engine: str, device):
    dtype = getattr(torch, args.dtype) if args.dtype else None
    attention = fast_engine_attention(args.attn_implementation) if engine == "fast" else args.attn_implementation
    model = load_model(
        args.checkpoint,
        dtype=dtype,
        device=None if args.auto else device,
        attn_implementation=attention,
        auto=args.auto,
    )
    return model, load_tokenizer(args.checkpoint)


def evaluate_set(name, args, choice: EngineChoice, model, tokenizer, rank, world_size, device):
    caption_set = CAPTION_SETS[name]
    entries, gt_file = read_entries(caption_set, args.data_root)
    dataset = CaptionImages.for_model(entries, model.config, args.dynamic, args.max_dynamic_patch)
    captioner = build_captioner(
        choice,
        model,
        tokenizer,
        caption_set.max_new_tokens,
        caption_set.min_new_tokens,
        temperature=args.temperature,
        cuda_graphs=args.cuda_graphs,
    )
    shard = ContiguousShardSampler(len(dataset), rank, world_size).indices
    dtype = next(model.parameters()).dtype
    ids, captions, elapsed, waited = generate_captions(
        dataset, captioner, shard, device, dtype, num_workers=args.num_workers, rank=rank
    )
    if rank == 0:
        print(f"rank 0 waited {waited:.1f} s of {elapsed:.1f} s for images (raise --num-workers if this is large)")
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (ids, captions, elapsed))
        ids = [i for part in gathered for i in part[0]]
        captions = [c for part in gathered for c in part[1]]
        elapsed = max(part[2] for part in gathered)
    if rank != 0:
        return None
    print(
        f"{name}: {len(ids)} images in {elapsed:.1f} s ({len(ids) / max(elapsed, 1e-9):.2f} images/s, "
        f"{world_size} process(es), {choice.engine} engine, batch {choice.batch_size})"
    )
    average_length = sum(len(caption.split()) for caption in captions) / max(len(captions), 1)
    print(f"average caption length: {average_length:.3f} words")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / f"{name}_{time.strftime('%y%m%d%H%M%S')}.json"
    results_file.write_text(json.dumps([{"image_id": int(i), "caption": c} for i, c in zip(ids, captions)]))
    print(f"results: {results_file}")
    if args.skip_scoring:
        return None
    if gt_file is None:
        gt_file = ground_truth_from_entries(entries, results_file.with_name(results_file.stem + "_gt.json"))
    metrics = score_captions(results_file, gt_file, spice=args.spice)
    summary = out_dir / ("_".join(Path(os.path.abspath(args.checkpoint)).parts[-2:]) + ".txt")
    with open(summary, "a") as handle:
        handle.write(json.dumps([args.checkpoint, name, average_length, metrics]) + "\n")
    print([args.checkpoint, name, average_length, metrics])
    print(f"summary appended to {summary}")
    data_root = f" --data-root {args.data_root}" if args.data_root else ""
    print(
        f"a page of the captions: python tools/caption_report.py {results_file} --set {name}{data_root} "
        "(more results files, e.g. before and after fine-tuning, to compare them)"
    )
    return metrics


def evaluate(argv: list[str]) -> None:
    args = parse_args(argv)
    rank, world_size, device = init_distributed()
    problems = input_problems(args, rank)
    if problems:
        refuse(problems)
    choice = choose_engine(
        InternVLChatConfig.from_pretrained(args.checkpoint),
        args.engine,
        args.num_beams,
        args.temperature,
        args.dynamic,
        args.batch_size,
    )
    torch.manual_seed(args.seed)
    model, tokenizer = load(args, choice.engine, device)
    num_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(
            f"loaded {args.checkpoint}: {num_params / 1e9:.2f}B parameters, {next(model.parameters()).dtype}, "
            f"attention: ViT {model.config.vision_config._attn_implementation}, LLM "
            f"{model.config.llm_config._attn_implementation}; LoRA r={model.config.use_llm_lora}, "
            f"{choice.engine} engine, batch {choice.batch_size}"
        )
    for name in args.datasets.split(","):
        evaluate_set(name, args, choice, model, tokenizer, rank, world_size, device)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    try:
        evaluate(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as error:
        refuse([user_error_line(error)])


if __name__ == "__main__":
    main()
