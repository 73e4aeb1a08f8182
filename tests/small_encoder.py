"""A stand-in with the FanEncoder's interface at a tiny cost, for tests that look at points, boxes and shapes."""
from __future__ import annotations

import torch
from torch import nn


class SmallEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, kernel_size=16, stride=16)
        self.head = nn.Linear(4, 554)

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(self.conv(crops).mean(dim=(2, 3)))
        return {"headpose": out[:, :6], "eye": out[:, 6:12], "emo": out[:, 12:42], "mouth": out[:, 42:]}
