"""InternViT: the vision encoder of InternVL2.

Two variants share this file: the 300M encoder (LayerNorm, qkv bias, no QK-norm) of InternVL2-1B..8B and the
6B encoder (RMSNorm, QK-norm over the full width, no qkv bias) of InternVL2-26B..76B. Both are pre-norm
transformers with layer scale and no final norm. Attention goes through transformers' dispatch table, so
`eager` (reference numerics), `sdpa` and `flash_attention_2` are one config switch apart.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_intern_vit import InternVisionConfig
from .fused_kernels import LayerNorm, add_scaled, add_then_norm
from .fused_kernels import RMSNorm as InternRMSNorm

NORM_LAYERS = {"rms_norm": InternRMSNorm, "layer_norm": LayerNorm}


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the whole residual branch), as timm's DropPath."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(3, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_positions, self.embed_dim))

    def _patch_position_embedding(self, height: int, width: int) -> torch.Tensor:
        pos = self.position_embedding[:, 1:, :]
        grid = self.image_size // self.patch_size
        if (height, width) == (grid, grid):
            return pos  # bicubic resampling to the same grid is the identity
        pos = pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2).float()
        pos = F.interpolate(pos, size=(height, width), mode="bicubic", align_corners=False)
        return pos.reshape(1, -1, height * width).permute(0, 2, 1).to(self.position_embedding.dtype)

    def _embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, H/p * W/p, C]: the patch convolution (kernel = stride = p), computed as one matmul
        over the flattened patches when they tile the image exactly, several times faster on a GPU than cuDNN's
        generic implicit-GEMM kernel for this shape (the same products, summed in another order)."""
        conv = self.patch_embedding
        batch, channels, height, width = pixel_values.shape
        p = self.patch_size
        if height % p or width % p:
            return conv(pixel_values).flatten(2).transpose(1, 2)
        rows, columns = height // p, width // p
        patches = pixel_values.reshape(batch, channels, rows, p, columns, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, rows * columns, channels * p * p)
        return F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Cast here: the original relies on Trainer/eval code to cast pixel_values to the weights' dtype.
        patch_embeds = self._embed_patches(pixel_values.to(self.patch_embedding.weight.dtype))
        batch_size = patch_embeds.shape[0]
        height, width = pixel_values.shape[2] // self.patch_size, pixel_values.shape[3] // self.patch_size
        class_embeds = self.class_embedding.expand(batch_size, 1, -1).to(patch_embeds.dtype)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        position_embedding = torch.cat(
            [self.position_embedding[:, :1, :], self._patch_position_embedding(height, width)], dim=1
        )
        return embeddings + position_embedding.to(embeddings.dtype)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention in the original's order of operations: (q * scale) @ k^T, softmax, @ v."""
    attn_weights = torch.matmul(query * scaling, key.transpose(-2, -1))
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = attn_weights.softmax(dim=-1)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class InternAttention(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"hidden_size {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        self.scale = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.attn_drop = config.attention_dropout
        self.proj_drop = nn.Dropout(config.dropout)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).reshape(batch, length, 3, self.embed_dim).unbind(2)
        if self.qk_normalization:
            # QK-norm spans all heads together (the full width), before the split into heads.
            q, k = self.q_norm(q), self.k_norm(k)
        heads = (batch, length, self.num_heads, self.head_dim)
        q, k, v = (t.reshape(heads).transpose(1, 2) for t in (q, k, v))
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention(
            self,
            q,
            k,
            v,
            None,
            scaling=self.scale,
            dropout=self.attn_drop if self.training else 0.0,
            is_causal=False,
        )
        return self.proj_drop(self.proj(out.reshape(batch, length, self.embed_dim)))


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class InternVisionEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: InternVisionConfig, drop_path_rate: float):
        super().__init__()
        norm = NORM_LAYERS[config.norm_type]
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = norm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = norm(config.hidden_size, eps=config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.drop_path1 = DropPath(drop_path_rate)
        self.drop_path2 = DropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attended = self.attn(self.norm1(hidden_states))
        if self._drops(self.drop_path1):
            hidden_states = hidden_states + self.drop_path1(attended * self.ls1)
            normed = self.norm2(hidden_states)
        else:  # the residual add and norm2 in one pass where the fused kernels apply
            hidden_states, normed = add_then_norm(hidden_states, attended, self.ls1, self.norm2)
        branch = self.mlp(normed)
        if self._drops(self.drop_path2):
            return hidden_states + self.drop_path2(branch * self.ls2)
        return add_scaled(hidden_states, branch, self.ls2)

    def _drops(self, drop_path: DropPath) -> bool:
        return self.training and drop_path.drop_prob > 0.0


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        last = max(config.num_hidden_layers - 1, 1)
        rates = [config.drop_path_rate * i / last for i in range(config.num_hidden_layers)]  # linspace(0, rate, n)
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config, rate) for rate in rates)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutput:
        all_hidden_states = (inputs_embeds,) if output_hidden_states else None
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


class InternVisionModel(PreTrainedModel):
    config_class = InternVisionConfig
    config: InternVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "vision_model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVisionEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: InternVisionConfig):
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, InternVisionEmbeddings):
            init.trunc_normal_(module.class_embedding, std=std)
            init.trunc_normal_(module.position_embedding, std=std)
        elif isinstance(module, InternVisionEncoderLayer):
            init.constant_(module.ls1, self.config.initializer_factor)
            init.constant_(module.ls2, self.config.initializer_factor)

    def get_input_embeddings(self):
        return self.embeddings

    def resize_pos_embeddings(self, old_size: int, new_size: int, patch_size: int):
        """Permanently resample the patch position table from an old_size to a new_size input (bicubic)."""
        pos = self.embeddings.position_embedding
        cls_pos, patch_pos = pos[:, :1, :], pos[:, 1:, :]
        old_grid, new_grid = old_size // patch_size, new_size // patch_size
        patch_pos = patch_pos.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
        patch_pos = F.interpolate(patch_pos, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype).reshape(1, -1, new_grid * new_grid).permute(0, 2, 1)
        self.embeddings.position_embedding = nn.Parameter(torch.cat([cls_pos, patch_pos], dim=1))
        self.embeddings.image_size = new_size
        self.config.image_size = new_size

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        pixel_embeds: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        if pixel_values is None and pixel_embeds is None:
            raise ValueError("InternVisionModel needs pixel_values or pixel_embeds")
        output_hidden_states = output_hidden_states or self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        hidden_states = pixel_embeds if pixel_embeds is not None else self.embeddings(pixel_values)
        encoded = self.encoder(hidden_states, output_hidden_states=output_hidden_states)
        last = encoded.last_hidden_state
        if not return_dict:
            return (last, last[:, 0, :]) + ((encoded.hidden_states,) if output_hidden_states else ())
        return BaseModelOutputWithPooling(
            last_hidden_state=last, pooler_output=last[:, 0, :], hidden_states=encoded.hidden_states
        )
