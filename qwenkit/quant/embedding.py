"""A token embedding read from an int8 table, swapped in from outside the model like the linears."""

from __future__ import annotations

import torch
from torch import nn

from .linear import Int8Linear


class Int8Embedding(nn.Module):
    """Rows of a symmetric int8 table times their scale: embedding[i] = weight[i] · scales[i].

    State dict: `weight` int8 [V, D], `scales` [V] (float dtype; the output dtype). It is Int8Linear's
    layout, so a tied model's embedding and int8 head share one table (`from_int8_linear`).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.scales = nn.Parameter(torch.empty(num_embeddings, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    def from_int8_linear(cls, linear: Int8Linear) -> Int8Embedding:
        """An embedding over the same tensors as `linear` (shared, not copied)."""
        embedding = cls(linear.out_features, linear.in_features, linear.scales.dtype, "meta")
        embedding.weight, embedding.scales = linear.weight, linear.scales
        return embedding

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weight[tokens].to(self.scales.dtype) * self.scales[tokens, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits=8"
