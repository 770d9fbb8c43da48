"""What captions a batch of test pictures: the Captioner interface, its two engines, and the choice between them.

The original evaluation's path (`ChatCaptioner`: `chat()` image by image, `batch_chat()` for larger batches, through
transformers' generate()) and the fast engine (`FastCaptioner`, eval/fast_captioner.py) give the same captions under
greedy decoding; they differ in how they want a shard's pictures batched, which is why that is part of the interface.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from ..data.formats import CAPTION_PROMPT
from .caption_data import CaptionImages
from .fast_captioner import FastCaptioner, supports_fast_path


class Captioner(Protocol):
    def batches(self, dataset: CaptionImages, indices: list[int]) -> list[list[int]]:
        """The shard's dataset indices (`indices`) as the batches this engine captions together."""
        ...

    def caption(self, pixel_values: torch.Tensor, tiles_per_image: list[int]) -> list[str]:
        """pixel_values: the normalised tiles of one batch, image after image, on the model's device and in its
        dtype; one caption per image, in order."""
        ...


class ChatCaptioner:
    """The original evaluation's path: `chat()` for a batch of one picture, `batch_chat()` (left-padded prompts)
    for more, in runs of `batch_size` consecutive pictures."""

    def __init__(
        self,
        model,
        tokenizer,
        question: str,
        max_new_tokens: int = 30,
        min_new_tokens: int = 8,
        batch_size: int = 1,
        num_beams: int = 1,
        temperature: float = 0.0,
    ):
        self.model, self.tokenizer, self.question, self.batch_size = model, tokenizer, question, batch_size
        self.generation_config = dict(
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=temperature > 0,
        )
        if temperature > 0:
            self.generation_config["temperature"] = temperature

    def batches(self, dataset: CaptionImages, indices: list[int]) -> list[list[int]]:
        return [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]

    def caption(self, pixel_values: torch.Tensor, tiles_per_image: list[int]) -> list[str]:
        if len(tiles_per_image) == 1:
            return [self.model.chat(self.tokenizer, pixel_values, self.question, self.generation_config)]
        return self.model.batch_chat(
            self.tokenizer,
            pixel_values,
            [self.question] * len(tiles_per_image),
            self.generation_config,
            num_patches_list=tiles_per_image,
        )


class EngineError(ValueError):
    """An engine asked for that cannot caption with this model or these settings; the message says why."""


@dataclass(frozen=True)
class EngineChoice:
    engine: str  # "fast" or "hf"
    batch_size: int
    num_beams: int


# Above this many LLM parameters the original evaluation decodes greedily whatever --num-beams says.
BEAM_SEARCH_MAX_LLM_PARAMETERS = 20e9


def choose_engine(
    config, requested_engine: str, num_beams: int, temperature: float, dynamic: bool, batch_size: int | None
) -> EngineChoice:
    """The engine, batch size and beams for a checkpoint's config (InternVLChatConfig), decided before the model
    is loaded since the engine decides the LLM's attention. requested_engine: "auto", "fast" or "hf"; batch_size
    None: the engine's default."""
    llm = config.llm_config
    hidden = llm.hidden_size
    # about: attention as if without GQA, embeddings left out
    llm_parameters = llm.num_hidden_layers * (4 * hidden * hidden + 3 * hidden * llm.intermediate_size)
    if llm_parameters > BEAM_SEARCH_MAX_LLM_PARAMETERS or dynamic:  # the original's rule
        num_beams = 1
    fast_ok = supports_fast_path(config) and num_beams == 1 and temperature == 0
    if requested_engine == "fast" and not fast_ok:
        reasons = [] if supports_fast_path(config) else [f"this checkpoint's LLM is {llm.architectures[0]}"]
        reasons += [f"--num-beams {num_beams}"] if num_beams != 1 else []
        reasons += [f"--temperature {temperature}"] if temperature != 0 else []
        raise EngineError(
            f"--engine fast needs greedy decoding and an LLM with decoder steps, but {' and '.join(reasons)}; "
            "leave --engine out (or --engine hf) to caption with chat()/batch_chat()"
        )
    engine = ("fast" if fast_ok else "hf") if requested_engine == "auto" else requested_engine
    if batch_size is None:
        batch_size = 32 if engine == "fast" else 1
    return EngineChoice(engine, batch_size, num_beams)


def build_captioner(
    choice: EngineChoice,
    model,
    tokenizer,
    max_new_tokens: int,
    min_new_tokens: int,
    temperature: float = 0.0,
    cuda_graphs: bool = True,
    profile: bool = False,
) -> Captioner:
    """The chosen engine with the original prompt, for a test set's caption lengths. The fast engine needs
    the model loaded with `fast_engine_attention(...)`; cuda_graphs and profile concern it only."""
    if choice.engine == "fast":
        return FastCaptioner(
            model,
            tokenizer,
            CAPTION_PROMPT,
            max_new_tokens,
            min_new_tokens,
            batch_size=choice.batch_size,
            profile=profile,
            cuda_graphs=cuda_graphs,
        )
    return ChatCaptioner(
        model,
        tokenizer,
        CAPTION_PROMPT,
        max_new_tokens,
        min_new_tokens,
        batch_size=choice.batch_size,
        num_beams=choice.num_beams,
        temperature=temperature,
    )
