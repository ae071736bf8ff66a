"""Small models trained the same way on a device, for the harp-vs-CPU comparisons."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.fc2(self.drop(F.gelu(self.norm(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 3 * 3, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def data(kind: str, n: int = 32):
    g = torch.Generator().manual_seed(7)
    if kind == "mlp":
        x = torch.randn(n, 16, generator=g)
        y = torch.randint(0, 4, (n,), generator=g)
    else:
        x = torch.randn(n, 1, 8, 8, generator=g)
        y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def train(kind: str, device: str, steps: int = 50, optimizer: str = "adam") -> list[float]:
    """The loss at every step of a seeded run on `device` (the model is made on the CPU)."""
    torch.manual_seed(0)
    model = (MLP() if kind == "mlp" else CNN()).to(device)
    x, y = data(kind)
    x, y = x.to(device), y.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2) if optimizer == "adam" else \
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)                    # the dropout masks' seed, on either device
    losses = []
    for step in range(steps):
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y) if step % 2 == 0 else \
            F.mse_loss(out.softmax(-1), F.one_hot(y, out.shape[-1]).to(out.dtype))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
