"""UCMFH: a fusion transformer over CLIP features (task 0) and hash heads on top of it (task 1).

Fusion architectures (params.yaml `model.arch`, registered in cmhash.config.choices.archs; each has its
own knobs in `model.<arch>`, and the hash heads theirs in `hash_head`, read by task 1 only):
  reference        concat(image, text) as one token -> TransformerEncoder (the public code)
  cross_attention  per-modality transformers, then cross-attention within the pair (the seed's variant)

Every item is encoded on its own: the encoders see a batch of per-item sequences ([B, 1, d],
at most [B, 2, d], batch_first), so an item's code never depends on its batch-mates (unlike the
reference, which feeds a 2-D batch to a sequence-first encoder and lets items attend to each other).

Two ways to encode, matching the two evaluation protocols:
  strict  image embedding from the image alone, text embedding from the text alone
          (the missing modality's slot is zero) - real cross-modal retrieval;
  paired  both embeddings from the whole (image, text) pair - the reference's setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from cmhash.config.choices.archs import ARCHS, CrossAttention, HashHeadConfig, Transformer
from cmhash.config.fields import Count, Section
from cmhash.errors import ConfigError, DataError
from cmhash.io import atomic_path, save_state, torch_load

PROTOCOLS = ("strict", "paired")


class ReferenceFusion(nn.Module):
    """concat(image, text) as one token -> TransformerEncoder -> L2-normalise -> split in halves."""

    def __init__(self, feature_dim: int, knobs: Transformer) -> None:
        super().__init__()
        d_model, nhead = knobs.d_model or 2 * feature_dim, knobs.nhead
        num_layers, dim_feedforward, dropout = knobs.num_layers, knobs.dim_feedforward, knobs.dropout
        if d_model % 2 or d_model % nhead:
            raise ConfigError(f"model.reference: d_model {d_model} must be even and divisible by nhead {nhead}")
        self.input = nn.Identity() if d_model == 2 * feature_dim else nn.Linear(2 * feature_dim, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.embed_dim = d_model // 2

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        token = self.input(torch.cat([image, text], dim=1)).unsqueeze(1)  # [B, 1, d]: one token per item
        fused = F.normalize(self.encoder(token).squeeze(1), dim=1)
        image_part, text_part = fused.chunk(2, dim=1)
        return image_part, text_part


class TokenEncoder(nn.Module):
    """One modality's feature as a one-token sequence -> (Linear to `width`) -> TransformerEncoder."""

    def __init__(self, feature_dim: int, width: int, nhead: int, num_layers: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.input = nn.Identity() if width == feature_dim else nn.Linear(feature_dim, width)
        layer = nn.TransformerEncoderLayer(width, nhead, dim_feedforward, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(self.input(x).unsqueeze(1))


class CrossAttentionBlock(nn.Module):
    """Post-norm, like nn.TransformerEncoderLayer, but the query attends to a `memory` sequence:
    x + Dropout(MHA(x, memory)) -> LayerNorm -> x + Dropout(FF) -> LayerNorm."""

    def __init__(self, width: int, nhead: int, dim_feedforward: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, nhead, dropout=attention_dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(width, dim_feedforward), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim_feedforward, width))
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, key_padding_mask: Tensor) -> Tensor:
        attended, _ = self.attn(x, memory, memory, key_padding_mask=key_padding_mask, need_weights=False)
        x = self.norm1(x + self.dropout(attended))
        return self.norm2(x + self.dropout(self.ff(x)))


class CrossAttentionFusion(nn.Module):
    """Per-modality transformers, then cross-attention within each pair (the seed's variant).

    An image transformer and a text transformer (each over its item's one
    token, [B, 1, w] with w = d_model / 2), then cross-attention both ways - the image token
    attends over the item's (image, text) token pair, and so does the text token - then each
    output is L2-normalised on its own. Attention never crosses items: every item is encoded
    independently of its batch-mates.

    An absent modality (an all-zero feature: the strict protocol's empty slot) is masked out of
    the cross-attention keys rather than fed in as zeros. A zero input is not "nothing": the
    encoder turns it into a learned constant token, the present modality would give it attention
    weight, and the strict embedding would be built partly from a made-up partner. With the mask
    the strict image embedding is exactly the image's own path (image encoder -> attention over
    itself -> FF). If both modalities of an item are absent nothing is masked (softmax over no
    keys would be NaN). `attention_dropout` drops attention weights; `dropout` is every other
    dropout (encoders, residuals, feed-forward)."""

    def __init__(self, feature_dim: int, knobs: CrossAttention) -> None:
        super().__init__()
        d_model, nhead = knobs.d_model or 2 * feature_dim, knobs.nhead
        num_layers, dim_feedforward, dropout = knobs.num_layers, knobs.dim_feedforward, knobs.dropout
        attention_dropout = knobs.attention_dropout
        width = d_model // 2
        if d_model % 2 or width % nhead:
            raise ConfigError(f"model.cross_attention: d_model {d_model} must be even and d_model/2 divisible by nhead {nhead}")

        self.image_encoder = TokenEncoder(feature_dim, width, nhead, num_layers, dim_feedforward, dropout)
        self.text_encoder = TokenEncoder(feature_dim, width, nhead, num_layers, dim_feedforward, dropout)
        self.image_cross = CrossAttentionBlock(width, nhead, dim_feedforward, dropout, attention_dropout)
        self.text_cross = CrossAttentionBlock(width, nhead, dim_feedforward, dropout, attention_dropout)
        self.embed_dim = width

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        absent = torch.stack([image.eq(0).all(dim=1), text.eq(0).all(dim=1)], dim=1)  # [B, 2], True = masked key
        absent &= ~absent.all(dim=1, keepdim=True)
        image_token, text_token = self.image_encoder(image), self.text_encoder(text)  # [B, 1, w] each
        pair = torch.cat([image_token, text_token], dim=1)  # [B, 2, w]: the item's own two tokens
        image_out = self.image_cross(image_token, pair, absent).squeeze(1)
        text_out = self.text_cross(text_token, pair, absent).squeeze(1)
        return F.normalize(image_out, dim=1), F.normalize(text_out, dim=1)


class HashHead(nn.Module):
    """L2-norm -> Linear -> ReLU -> Dropout -> Linear(bits) -> tanh -> L2-norm; codes are its sign.
    With `feature_dim`, a linear path from the modality's own (L2-normalised) CLIP features is
    added before the tanh (hash_head.init: cca_itq)."""

    def __init__(self, embed_dim: int, hidden: int, bits: int, dropout: float, feature_dim: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, bits))
        self.linear = nn.Linear(feature_dim, bits) if feature_dim else None

    def forward(self, x: Tensor, features: Tensor | None = None) -> Tensor:
        z = self.net(F.normalize(x, dim=1))
        if self.linear is not None:
            z = z + self.linear(F.normalize(features, dim=1))
        return F.normalize(torch.tanh(z), dim=1)

    @torch.no_grad()
    def start_from(self, mean: Tensor, projection: Tensor) -> None:
        """The linear path becomes (x - mean) @ projection and the MLP's output zero: the head's
        codes are then exactly sign((x - mean) @ projection), a baseline's codes."""
        self.linear.weight.copy_(projection.T)
        self.linear.bias.copy_(-(mean @ projection))
        self.net[-1].weight.zero_()
        self.net[-1].bias.zero_()


class ModelConfig(Section):
    """What a checkpoint rebuilds its model from (its `config`, saved as plain data)."""

    arch: str  # an ARCHS name
    knobs: dict[str, Any]  # model.<arch>
    feature_dim: Count
    bits: Count | None = None  # None: task 0 (fusion only)
    hash_head: HashHeadConfig | None = None  # task 1
    loss: str = ""  # what it was trained with, for the record
    clip: dict[str, Any] = {}  # what its features were made with: clip_model, pretrained, random_init

    def fusion_part(self) -> dict[str, Any]:
        """What the fusion weights depend on: task 1 starts only from a task-0 model that matches."""
        return {"arch": self.arch, "knobs": self.knobs, "feature_dim": self.feature_dim}


class CrossModalHasher(nn.Module):
    """The fusion encoder, plus image/text hash heads when `bits` is set (task 1)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        entry = ARCHS.entry(config.arch)
        self.fusion = entry.load()(config.feature_dim, entry.knobs.model_validate(config.knobs))
        bits, head = config.bits, config.hash_head
        if bits and head is None:
            raise ConfigError("a hash model (bits set) needs its hash_head settings")
        linear = config.feature_dim if bits and head.init == "cca_itq" else None
        self.image_head = HashHead(self.fusion.embed_dim, head.hidden, bits, head.dropout, linear) if bits else None
        self.text_head = HashHead(self.fusion.embed_dim, head.hidden, bits, head.dropout, linear) if bits else None

    # CLIP features are L2-normalised on the way in: the scale of random-init or other CLIP
    # variants then does not matter, and a zero vector unambiguously means "modality absent".
    def embed(self, image: Tensor, text: Tensor, protocol: str) -> tuple[Tensor, Tensor]:
        image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
        if protocol == "paired":
            return self.fusion(image, text)
        image_emb, _ = self.fusion(image, torch.zeros_like(text))
        _, text_emb = self.fusion(torch.zeros_like(image), text)
        return image_emb, text_emb

    def hash(self, image_emb: Tensor, text_emb: Tensor, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """Hash outputs of the embeddings; `image`, `text`: the CLIP features they came from (read
        only by a head with a linear path: the image head's from the image, the text head's from the text)."""
        assert self.image_head is not None and self.text_head is not None, "model has no hash heads (task 0)"
        return self.image_head(image_emb, image), self.text_head(text_emb, text)


def to_codes(x: Tensor) -> Tensor:
    """±1 int8 codes; exact zeros map to +1 so every bit is defined."""
    return torch.where(x >= 0, 1, -1).to(torch.int8)


@torch.no_grad()
def encode(model: CrossModalHasher, image: Tensor, text: Tensor, protocol: str, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Eval-mode outputs for every item (no dropped remainder): hash outputs if the model has
    heads, else fused embeddings. Chunked only to bound memory; items are independent."""
    model.eval()
    outs: list[tuple[Tensor, Tensor]] = []
    for start in range(0, len(image), batch_size):
        chunk = image[start : start + batch_size], text[start : start + batch_size]
        emb = model.embed(*chunk, protocol)
        outs.append(model.hash(*emb, *chunk) if model.image_head is not None else emb)
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def save_checkpoint(path: Path, model: CrossModalHasher, **extra: Any) -> None:
    # The config goes in as plain data: weights_only loading admits no pydantic objects.
    with atomic_path(path) as tmp:
        save_state(tmp, {"config": model.config.model_dump(), "state_dict": model.state_dict(), **extra})


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[CrossModalHasher, dict[str, Any]]:
    """Rebuild a model from its checkpoint. Loading never runs code from the file (safeload)."""
    if not Path(path).is_file():
        raise DataError(f"checkpoint not found: {path} (run the stage that writes it first)")
    ckpt = torch_load(path, device)
    if not isinstance(ckpt, dict) or not {"config", "state_dict"} <= ckpt.keys():
        raise DataError(f"{path} is not a cmhash model checkpoint (no config and state_dict); re-run the stage that writes it")
    try:
        model = CrossModalHasher(ModelConfig.model_validate(ckpt["config"])).to(device)
        model.load_state_dict(ckpt["state_dict"])
    except (ValidationError, ConfigError, RuntimeError) as exc:
        raise DataError(f"{path} does not match this version's models ({str(exc).splitlines()[0]}); re-run the stage that writes it") from None
    return model, ckpt
