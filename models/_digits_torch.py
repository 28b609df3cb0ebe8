"""PyTorch definitions used only to *train* the digits fixtures.

The parameter names of these modules (``state_dict`` keys) are exactly the
initializer names of the ONNX graphs written by :mod:`models.digits`, so the
trained weights can be copied over one to one. Nothing here is needed to load or
run the shipped ONNX files.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as fn

HEADS = 4
HEAD_DIM = 8
D_MODEL = HEADS * HEAD_DIM
D_FF = 64
MAX_LEN = 16


class ConvBN(nn.Module):
    """Conv2d followed by BatchNorm2d (exported as two separate nodes)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        *,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return fn.relu(y + x)


class DigitsCNN(nn.Module):
    """stem -> residual block -> depthwise/pointwise -> maxpool -> concat -> MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(1, 16, 3)
        self.block1 = ResidualBlock(16)
        self.dw = ConvBN(16, 16, 3, groups=16)
        self.pw = ConvBN(16, 32, 1)
        self.branch_a = ConvBN(32, 16, 1, bias=True)
        self.branch_b = ConvBN(32, 16, 3, bias=True)
        self.dropout = nn.Dropout(0.1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fn.relu(self.stem(x))
        x = self.block1(x)
        x = fn.relu(self.dw(x))
        x = fn.relu(self.pw(x))
        x = fn.max_pool2d(x, 2)
        x = torch.cat([fn.relu(self.branch_a(x)), fn.relu(self.branch_b(x))], dim=1)
        x = self.dropout(torch.flatten(x, 1))
        return self.fc2(fn.relu(self.fc1(x)))


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(fn.relu(self.fc2(fn.relu(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(D_MODEL, D_MODEL)
        self.k = nn.Linear(D_MODEL, D_MODEL)
        self.v = nn.Linear(D_MODEL, D_MODEL)
        self.out = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q(x).reshape(batch, seq, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(x).reshape(batch, seq, HEADS, HEAD_DIM).permute(0, 2, 3, 1)
        v = self.v(x).reshape(batch, seq, HEADS, HEAD_DIM).transpose(1, 2)
        scores = torch.matmul(q, k) / math.sqrt(HEAD_DIM)
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(ctx.transpose(1, 2).reshape(batch, seq, D_MODEL))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_MODEL, D_FF)
        self.fc2 = nn.Linear(D_FF, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(fn.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.attn = Attention()
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.ffn = FeedForward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class DigitsTransformer(nn.Module):
    """Pre-LN encoder over the 8 image rows as tokens, mean-pooled classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, D_MODEL)
        self.pos = nn.Parameter(torch.randn(MAX_LEN, D_MODEL) * 0.02)
        self.block = EncoderBlock()
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        h = self.ln_f(self.block(h))
        return self.head(h.mean(dim=1))


def make_net(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    nets: dict[str, type[nn.Module]] = {
        "cnn": DigitsCNN,
        "mlp": DigitsMLP,
        "transformer": DigitsTransformer,
    }
    return nets[kind]()


def train(
    net: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
) -> nn.Module:
    """Adam + cosine schedule, deterministic for a seed; returns ``net`` in eval mode."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch_size):
            idx = perm[start : start + batch_size]
            loss = fn.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


def predict(net: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net.eval()(torch.from_numpy(x)).numpy()


def weights(net: nn.Module) -> dict[str, np.ndarray]:
    """``state_dict`` as float32 numpy arrays (BN step counters dropped)."""
    return {
        name: t.detach().cpu().numpy().astype(np.float32)
        for name, t in net.state_dict().items()
        if not name.endswith("num_batches_tracked")
    }
