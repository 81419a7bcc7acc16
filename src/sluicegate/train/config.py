"""The training settings: one model that the Prefect run forms, the CLI's `run` options, the
MLflow params and the checkpoint key are all derived from (torch-free, so the CLI stays quick)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Precision = Literal["auto", "fp32", "bf16", "fp16"]
ModelKind = Literal["mlp", "ft_transformer"]
Device = Literal["auto", "cpu", "cuda", "mps"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelKind = Field("mlp", description="Architecture: MLP (fast) or FT-Transformer")
    max_epochs: int = Field(20, ge=1, le=200, description="Upper bound on training epochs")
    patience: int = Field(3, ge=1, le=20, description="Epochs without validation gain before stopping")
    seed: int = Field(0, description="Training seed")
    device: Device = Field("auto", description="Training device")
    precision: Precision = Field("auto", description="Training precision")
    compile: bool = Field(False, description="torch.compile the training step (first epoch pays the compile)")
    distill: bool = Field(False, description="Ship an MLP distilled from an FT-Transformer teacher")
    batch_size: int = Field(2048, ge=16, description="Global batch size, split across processes under DDP")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-5, ge=0, description="AdamW weight decay")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout in both architectures")
    hidden: int = Field(128, ge=1, description="MLP: hidden width")
    layers: int = Field(2, ge=1, description="MLP: hidden layers")
    embedding_dim: int = Field(8, ge=1, description="MLP: width of each categorical embedding")
    # FT-Transformer: small, because tabular rows have few tokens and serving is latency-bound
    d_token: int = Field(32, ge=1, description="FT-Transformer: token width")
    n_blocks: int = Field(2, ge=1, description="FT-Transformer: transformer blocks")
    n_heads: int = Field(4, ge=1, description="FT-Transformer: attention heads (must divide d_token)")
    ffn_factor: float = Field(2.0, gt=0, description="FT-Transformer: feed-forward width as a multiple of d_token")
    deterministic: bool = Field(False, description="Deterministic kernels (slower; for reproducing a run)")
    world_size: int = Field(0, ge=0, description="DDP processes; 0 = one per visible GPU (one without GPUs)")
    distill_alpha: float = Field(0.5, ge=0, le=1, description="Weight of the teacher's soft labels in the loss")
    distill_temperature: float = Field(2.0, gt=0, description="Softmax temperature of the teacher's labels")
