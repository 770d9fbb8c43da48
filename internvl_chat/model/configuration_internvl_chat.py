"""Configuration of InternVLChatModel: a vision config, an LLM config and the fields that join them.

`llm_config` is dispatched on `architectures[0]`, as in the original: InternLM2 uses our own config class,
Llama, Qwen2, Qwen3 (InternVL3.5) and Phi3 use the transformers ones.
"""

import warnings

import transformers
from packaging.version import Version

# The transformers releases this model code is tested with (requirements.txt states the same range; the tests
# check that the two agree). Older ones lack the APIs it uses; newer ones may rename them.
TESTED_TRANSFORMERS = ("5.17.0", "5.24.0")


def check_transformers_version(version: str = transformers.__version__) -> None:
    """Once, when the remote code is imported: an older transformers stops here with the range to install, instead
    of failing with an AttributeError in a forward pass; a newer one than tested is named in a warning."""
    lowest, highest = TESTED_TRANSFORMERS
    if Version(version) < Version(lowest):
        raise ImportError(
            f"This InternVL2 checkpoint's code needs transformers {lowest} or newer (tested {lowest} to {highest}); "
            f"this environment has {version}: pip install 'transformers>={lowest},<={highest}'"
        )
    if Version(Version(version).base_version) > Version(highest):
        warnings.warn(
            f"This InternVL2 checkpoint's code is tested with transformers {lowest} to {highest}; this environment "
            f"has {version}",
            stacklevel=2,
        )


check_transformers_version()

from transformers import LlamaConfig, Phi3Config, PretrainedConfig, Qwen2Config, Qwen3Config  # noqa: E402

from .configuration_intern_vit import InternVisionConfig  # noqa: E402
from .configuration_internlm2 import InternLM2Config  # noqa: E402

LLM_CONFIG_CLASSES = {
    "LlamaForCausalLM": LlamaConfig,
    "InternLM2ForCausalLM": InternLM2Config,
    "Phi3ForCausalLM": Phi3Config,
    "Qwen2ForCausalLM": Qwen2Config,
    "Qwen3ForCausalLM": Qwen3Config,
}


# The LLMs whose checkpoints may tie the LM head to the embeddings, as their llm_config says (InternVL3.5's Qwen3).
TIE_FROM_LLM_CONFIG = ("Qwen3ForCausalLM",)


def _modernize_phi3_rope(llm_config: dict) -> dict:
    """Phi-3 checkpoints of 2024 write rope_scaling {"type": "su", short_factor, long_factor}; transformers 5
    calls the same scheme "longrope" and wants original_max_position_embeddings inside the dict."""
    scaling = llm_config.get("rope_scaling")
    if not isinstance(scaling, dict) or scaling.get("type") not in ("su", "longrope"):
        return llm_config
    llm_config = dict(llm_config)
    llm_config["rope_scaling"] = {
        "rope_type": "longrope",
        "short_factor": scaling["short_factor"],
        "long_factor": scaling["long_factor"],
        "original_max_position_embeddings": llm_config.get("original_max_position_embeddings", 4096),
        "rope_theta": llm_config.get("rope_theta", 10000.0),
    }
    return llm_config


def build_llm_config(llm_config: dict | PretrainedConfig | None) -> PretrainedConfig:
    if isinstance(llm_config, PretrainedConfig):
        return llm_config
    llm_config = dict(llm_config or {"architectures": ["InternLM2ForCausalLM"]})
    arch = (llm_config.get("architectures") or ["InternLM2ForCausalLM"])[0]
    if arch not in LLM_CONFIG_CLASSES:
        raise ValueError(f"Unsupported llm architecture {arch!r}; expected one of {sorted(LLM_CONFIG_CLASSES)}")
    if arch == "Phi3ForCausalLM":
        llm_config = _modernize_phi3_rope(llm_config)
    return LLM_CONFIG_CLASSES[arch](**llm_config)


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True
    # Declared so that transformers hands a requested attn_implementation (a string, or a dict with these keys) on
    # to the two parts. A value stored in a checkpoint's llm_config is not a request: the original's constructor
    # always chose the attention itself, and so does InternVLChatModel.
    sub_configs = {"vision_config": InternVisionConfig, "llm_config": PretrainedConfig}

    def __init__(
        self,
        vision_config=None,
        llm_config=None,
        use_backbone_lora=0,
        use_llm_lora=0,
        pad2square=False,
        select_layer=-1,
        force_image_size=None,
        downsample_ratio=0.5,
        template=None,
        dynamic_image_size=False,
        use_thumbnail=False,
        ps_version="v1",
        min_dynamic_patch=1,
        max_dynamic_patch=6,
        **kwargs,
    ):
        if isinstance(vision_config, InternVisionConfig):
            self.vision_config = vision_config
        else:
            self.vision_config = InternVisionConfig(**(vision_config or {}))
        self.llm_config = build_llm_config(llm_config)
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.pad2square = pad2square
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        kwargs.pop("hidden_size", None)  # always derived from the LLM
        # InternVL2/2.5/3 store the LM head apart from the embeddings for every size (their code forces it);
        # InternVL3.5's code takes the Qwen3 LLM's own setting, so a tied head is tied here too
        architecture = (self.llm_config.architectures or ["InternLM2ForCausalLM"])[0]
        tied = architecture in TIE_FROM_LLM_CONFIG and bool(self.llm_config.tie_word_embeddings)
        kwargs["tie_word_embeddings"] = tied
        super().__init__(**kwargs)
        self.hidden_size = self.llm_config.hidden_size
        self.llm_config.tie_word_embeddings = tied
        # The originals map AutoModelForCausalLM to the model too; save_pretrained adds AutoConfig and AutoModel.
        self.auto_map = {
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
            **(getattr(self, "auto_map", None) or {}),
        }

    @property
    def tile_size(self) -> int:
        """The side of one image tile: force_image_size when set (InternVL2: 448), else the ViT's own size."""
        return self.force_image_size or self.vision_config.image_size

    @property
    def num_image_token(self) -> int:
        """<IMG_CONTEXT> tokens a tile: (tile / patch)^2 ViT patches, merged downsample_ratio^-2 to one by the pixel
        shuffle (InternVL2: 448 / 14 = 32, 32^2 / 4 = 256)."""
        return int((self.tile_size // self.vision_config.patch_size) ** 2 * self.downsample_ratio**2)
