"""Conditional position encoding (CPE) for visual tokens.

CA layers read visual tokens that no SA layer may have touched, so the tokens need to carry their own
position. The paper adds a depth-wise 1-D convolution (kernel 7, padding 3) with a residual right after the
projector. It is applied per image, so neighbouring images never mix, and starts at zero output so a
converted model is unchanged until it trains.
"""

from __future__ import annotations

import torch
from torch import nn


class ConditionalPositionEncoding(nn.Module):
    def __init__(self, hidden_size: int, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel_size, padding=kernel_size // 2, groups=hidden_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.conv.weight.zero_()
        self.conv.bias.zero_()

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """One image's tokens (N, d) → (N, d), in the packed order LLaVA-OV feeds the language model."""
        return image_tokens + self.conv(image_tokens.T[None])[0].T
