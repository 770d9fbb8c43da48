"""One process's share of a test set captioned: its pictures loaded in the batches the engine asks for, normalised on
the device, and captioned; the captions come back in dataset order, whatever order the engine took them in."""

import sys
import time

import torch
from torch.utils.data import DataLoader

from .caption_data import CaptionImages, collate_images, single_threaded_worker, split_into_chunks
from .captioner import Captioner


def generate_captions(
    dataset: CaptionImages,
    captioner: Captioner,
    shard: list[int],
    device: torch.device,
    dtype: torch.dtype,
    num_workers: int = 1,
    rank: int = 0,
) -> tuple[list[int], list[str], float, float]:
    """Caption the dataset indices `shard`. Returns their image ids and captions in dataset order, the seconds
    taken, and the seconds spent waiting for the data loader (a loader-bound run shows it here). Only rank 0 shows
    a progress bar."""
    chunks = split_into_chunks(captioner.batches(dataset, shard), num_workers)
    loader = DataLoader(
        dataset,
        batch_sampler=[chunk for batch in chunks for chunk in batch],
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
        worker_init_fn=single_threaded_worker,
    )

    from tqdm import tqdm

    by_id = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    # into a log file (not a terminal) a line every 30 s, not one a batch
    progress = tqdm(
        total=len(shard),
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
        by_id.update(zip(image_ids, captioner.caption(pixel_values, tiles)))
        progress.update(len(image_ids))
    progress.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ids = [dataset.entries[index]["image_id"] for index in shard]
    return ids, [by_id[image_id] for image_id in ids], time.perf_counter() - start, waited
