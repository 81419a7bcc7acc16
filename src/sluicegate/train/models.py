"""The model architectures. Both take the same raw model input and return a probability.

Normalization statistics are buffers, so an exported ONNX graph takes the raw
model input and nothing is re-implemented at serving time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sluicegate.train.config import ModelKind

if TYPE_CHECKING:
    from sluicegate.train.config import TrainConfig



class _Normalized(nn.Module):
    """Holds the numeric normalization as buffers."""

    def __init__(self, n_numeric: int, mean: np.ndarray | None, std: np.ndarray | None):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean if mean is not None else np.zeros(n_numeric),
                                                     dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std if std is not None else np.ones(n_numeric),
                                                    dtype=torch.float32))

    def normalize(self, numeric: torch.Tensor) -> torch.Tensor:
        return (numeric - self.mean) / self.std

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(numeric, categorical))


class TabularMLP(_Normalized):
    """Embeddings for categoricals, normalized numerics, an MLP, a sigmoid."""

    def __init__(self, n_numeric: int, cardinalities: list[int], cfg: TrainConfig,
                 mean: np.ndarray | None = None, std: np.ndarray | None = None):
        super().__init__(n_numeric, mean, std)
        self.embeddings = nn.ModuleList(nn.Embedding(n, cfg.embedding_dim) for n in cardinalities)
        width = n_numeric + cfg.embedding_dim * len(cardinalities)
        layers: list[nn.Module] = []
        for _ in range(cfg.layers):
            layers += [nn.Linear(width, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = cfg.hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def logits(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        embedded = [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        return self.mlp(torch.cat([self.normalize(numeric), *embedded], dim=1)).squeeze(1)


class FTTransformer(_Normalized):
    """Feature tokenizer + transformer encoder (Gorishniy et al., 2021).

    Every feature becomes a token: a numeric value scales its own learned vector
    (plus a bias), a category looks up its own embedding. A [CLS] token is
    prepended; the prediction reads the [CLS] token after pre-norm blocks.
    """

    def __init__(self, n_numeric: int, cardinalities: list[int], cfg: TrainConfig,
                 mean: np.ndarray | None = None, std: np.ndarray | None = None):
        super().__init__(n_numeric, mean, std)
        d = cfg.d_token
        self.num_weight = nn.Parameter(torch.randn(n_numeric, d) / d ** 0.5)
        self.num_bias = nn.Parameter(torch.zeros(n_numeric, d))
        # One table for all categorical columns; offsets pick each column's slice.
        self.register_buffer("cat_offsets", torch.as_tensor(np.cumsum([0, *cardinalities[:-1]]), dtype=torch.int64))
        self.cat_embedding = nn.Embedding(sum(cardinalities), d)
        self.cat_bias = nn.Parameter(torch.zeros(len(cardinalities), d))
        self.cls = nn.Parameter(torch.randn(1, 1, d) / d ** 0.5)
        self.blocks = nn.ModuleList(_Block(d, cfg.n_heads, cfg.ffn_factor, cfg.dropout) for _ in range(cfg.n_blocks))
        self.head = nn.Sequential(nn.LayerNorm(d), nn.ReLU(), nn.Linear(d, 1))

    def logits(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        num_tokens = self.normalize(numeric).unsqueeze(-1) * self.num_weight + self.num_bias
        cat_tokens = self.cat_embedding(categorical + self.cat_offsets) + self.cat_bias
        cls = self.cls.expand(numeric.shape[0], -1, -1)
        x = torch.cat([cls, num_tokens, cat_tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0]).squeeze(1)


class _Block(nn.Module):
    """Pre-norm multi-head self-attention and a GELU feed-forward, both residual.

    Written out with scaled_dot_product_attention rather than nn.TransformerEncoderLayer,
    whose fused inference path is a single opaque op the ONNX exporter must decompose.
    """

    def __init__(self, d: int, heads: int, ffn_factor: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        hidden = int(d * ffn_factor)
        self.ffn = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.ffn(self.norm2(x))


ARCHITECTURES: dict[str, type[_Normalized]] = {"mlp": TabularMLP, "ft_transformer": FTTransformer}


def build_model(kind: ModelKind, n_numeric: int, cardinalities: list[int], cfg: TrainConfig,
                mean: np.ndarray | None = None, std: np.ndarray | None = None) -> nn.Module:
    if kind not in ARCHITECTURES:
        raise ValueError(f"unknown model {kind!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[kind](n_numeric, cardinalities, cfg, mean, std)
