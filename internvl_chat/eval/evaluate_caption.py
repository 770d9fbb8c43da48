"""Caption generation and COCO scoring: the torchrun target of evaluate.sh.

  torchrun --nproc_per_node=4 internvl_chat/eval/evaluate_caption.py --checkpoint pretrained/InternVL2-2B \
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

if __package__ in (None, ""):  # run as a script by torchrun: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from internvl_chat.data.transforms import ImageError  # noqa: E402
from internvl_chat.eval.caption_data import (  # noqa: E402
    CaptionImages,
    ContiguousShardSampler,
    TileGroupedBatches,
    collate_images,
    single_threaded_worker,
    split_into_chunks,
    tile_counts,
)
from internvl_chat.eval.caption_sets import (  # noqa: E402
    CAPTION_PROMPT,
    CAPTION_SETS,
    ground_truth_from_entries,
    read_entries,
)
from internvl_chat.eval.fast_captioner import FastCaptioner, fast_engine_attention, supports_fast_path  # noqa: E402
from internvl_chat.eval.inputs import INPUT_ERRORS, check_inputs, parse_args, user_error_line  # noqa: E402
from internvl_chat.eval.scoring import score_captions  # noqa: E402
from internvl_chat.model.configuration_internvl_chat import InternVLChatConfig  # noqa: E402
from internvl_chat.model.loader import load_model, load_tokenizer  # noqa: E402


def init_distributed() -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world_size > 1 else 0), world_size, device


def load(args, device):
    dtype = getattr(torch, args.dtype) if args.dtype else None
    attention = fast_engine_attention(args.attn_implementation) if args.engine == "fast" else args.attn_implementation
    model = load_model(
        args.checkpoint,
        dtype=dtype,
        device=None if args.auto else device,
        attn_implementation=attention,
        auto=args.auto,
    )
    return model, load_tokenizer(args.checkpoint)


def choose_engine(args, config) -> None:
    """The engine and the batch size, decided from the checkpoint's config before the model is loaded (the
    engine decides the LLM's attention)."""
    llm = config.llm_config
    hidden = llm.hidden_size
    llm_parameters = llm.num_hidden_layers * (4 * hidden * hidden + 3 * hidden * llm.intermediate_size)
    if llm_parameters > 20e9 or args.dynamic:  # about: attention as if without GQA, embeddings left out
        args.num_beams = 1  # as the original: beam search only for models under 20B and without dynamic tiles
    fast_ok = supports_fast_path(config) and args.num_beams == 1 and args.temperature == 0
    if args.engine == "fast" and not fast_ok:
        raise SystemExit("evaluate_caption: --engine fast needs an InternLM2-based model with greedy decoding")
    if args.engine == "auto":
        args.engine = "fast" if fast_ok else "hf"
    if args.batch_size is None:
        args.batch_size = 32 if args.engine == "fast" else 1


def caption_batch(model, tokenizer, pixel_values, tiles, generation_config) -> list[str]:
    if len(tiles) == 1:  # the original's path, image by image
        return [model.chat(tokenizer, pixel_values, CAPTION_PROMPT, generation_config)]
    return model.batch_chat(
        tokenizer, pixel_values, [CAPTION_PROMPT] * len(tiles), generation_config, num_patches_list=tiles
    )


def generate_captions(args, caption_set, entries, model, tokenizer, rank, world_size, device):
    """Caption this rank's contiguous block of `entries`. Returns image ids and captions in dataset order, the
    seconds taken, and the seconds spent waiting for the data loader (a loader-bound run shows it here)."""
    config = model.config
    dataset = CaptionImages(entries, config.tile_size, args.dynamic, args.max_dynamic_patch, config.use_thumbnail)
    sampler = ContiguousShardSampler(len(dataset), rank, world_size)
    if args.engine == "fast":
        counts = tile_counts(
            entries, dataset.transform.image_size, args.dynamic, args.max_dynamic_patch, config.use_thumbnail
        )
        batches = list(TileGroupedBatches(sampler.indices, counts, args.batch_size))
        captioner = FastCaptioner(
            model,
            tokenizer,
            CAPTION_PROMPT,
            caption_set.max_new_tokens,
            caption_set.min_new_tokens,
            profile=getattr(args, "profile", False),
            cuda_graphs=getattr(args, "cuda_graphs", True),
        )
    else:
        indices = sampler.indices
        batches = [indices[i : i + args.batch_size] for i in range(0, len(indices), args.batch_size)]
    chunks = split_into_chunks(batches, args.num_workers)
    loader = DataLoader(
        dataset,
        batch_sampler=[chunk for batch in chunks for chunk in batch],
        num_workers=args.num_workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
        worker_init_fn=single_threaded_worker,
    )
    generation_config = dict(
        num_beams=args.num_beams,
        max_new_tokens=caption_set.max_new_tokens,
        min_new_tokens=caption_set.min_new_tokens,
        do_sample=args.temperature > 0,
    )
    if args.temperature > 0:
        generation_config["temperature"] = args.temperature
    dtype = next(model.parameters()).dtype

    from tqdm import tqdm

    by_id = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    # into a log file (not a terminal) a line every 30 s, not one a batch
    progress = tqdm(
        total=len(sampler),
        desc=f"captions rank {rank}",
        unit="img",
        disable=rank != 0,
        dynamic_ncols=True,
        mininterval=0.1 if sys.stderr.isatty() else 30,
    )
    waited = 0.0

    def device_batches():
        """(image ids, normalised tiles on the device, tiles per image) per batch; the loader's chunks are
        concatenated on the device. Counts the seconds spent waiting for the loader."""
        nonlocal waited
        items = iter(loader)
        for batch_chunks in chunks:
            asked = time.perf_counter()
            image_ids, parts, tiles = [], [], []
            for _ in batch_chunks:
                chunk_ids, chunk_pixels, chunk_tiles = next(items)
                image_ids += chunk_ids
                tiles += chunk_tiles
                parts.append(chunk_pixels.to(device, non_blocking=True))
            waited += time.perf_counter() - asked
            pixels = torch.cat(parts) if len(parts) > 1 else parts[0]
            yield image_ids, dataset.transform.normalize(pixels).to(dtype), tiles

    for image_ids, pixel_values, tiles in device_batches():
        if args.engine == "fast":
            batch_captions = captioner.caption(pixel_values, tiles[0])
        else:
            batch_captions = caption_batch(model, tokenizer, pixel_values, tiles, generation_config)
        by_id.update(zip(image_ids, batch_captions))
        progress.update(len(image_ids))
    progress.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    if args.engine == "fast" and captioner.timer.enabled:
        print("fast engine phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in captioner.timer.seconds.items()))
    ids = [entries[index]["image_id"] for index in sampler.indices]  # the shard in dataset order
    return ids, [by_id[image_id] for image_id in ids], time.perf_counter() - start, waited


def evaluate_set(name, args, model, tokenizer, rank, world_size, device):
    caption_set = CAPTION_SETS[name]
    entries, gt_file = read_entries(caption_set, args.data_root)
    ids, captions, elapsed, waited = generate_captions(
        args, caption_set, entries, model, tokenizer, rank, world_size, device
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
        f"{world_size} process(es), {args.engine} engine, batch {args.batch_size})"
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


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank, world_size, device = init_distributed()
    check_inputs(args, rank)
    choose_engine(args, InternVLChatConfig.from_pretrained(args.checkpoint))
    torch.manual_seed(args.seed)
    model, tokenizer = load(args, device)
    num_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(
            f"loaded {args.checkpoint}: {num_params / 1e9:.2f}B parameters, {next(model.parameters()).dtype}, "
            f"attention: ViT {model.config.vision_config._attn_implementation}, LLM "
            f"{model.config.llm_config._attn_implementation}; LoRA r={model.config.use_llm_lora}, "
            f"{args.engine} engine, batch {args.batch_size}"
        )
    for name in args.datasets.split(","):
        evaluate_set(name, args, model, tokenizer, rank, world_size, device)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (*INPUT_ERRORS, ImageError) as error:  # a picture that does not decode, found while captioning
        rank = os.environ.get("RANK")
        print(f"evaluate_caption{f' (process {rank})' if rank else ''}: {user_error_line(error)}", file=sys.stderr)
        sys.exit(2)
