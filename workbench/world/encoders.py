"""Small modality encoders (pretrained briefly, then frozen), linear projectors and towers.

Every encoder maps a raw input (one, or a batch with a leading dim) to tokens
``[n_tokens, d_enc]`` (``[B, n_tokens, d_enc]`` batched). A :class:`Projector` maps ``d_enc`` to
the LLM's hidden size; a :class:`Tower` chains the two and is what
:class:`workbench.mllm.MultimodalLM` splices in at a placeholder.

Encoders are saved as ``model.safetensors`` + ``config.json`` (``{"class", "modality", ...}``) and
re-created with :func:`load_encoder`; projectors likewise with :func:`load_projector`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .generators import RAW_SHAPES

D_ENC = 64


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)``, computed as the maximum of the four strided quarters of the input where no gradient
    flows through it (a frozen encoder: training the experts on top of it, every evaluation).

    The same value as ``max_pool2d`` (a maximum is exact, whatever the order it is taken in; an odd edge row or
    column is dropped as there), faster on CPU for these encoders' feature maps: ``benchmarks/encoder_pool.py``
    (one thread, batch 64, the idle Zen 4 box, 2026-12-08) measured the pooling alone at 0.09-0.30 of
    ``max_pool2d``'s time and the image / video / capability encoders' forward at 0.59 / 0.64 / 0.59, the same
    outputs bit for bit (the pooling was about 5% of an expert's training step). Where the input needs a gradient
    (pretraining an encoder) it is ``max_pool2d`` itself, whose backward sends a tie's gradient to one element as
    before. No parameters: a :class:`torch.nn.Sequential` holding it has ``nn.MaxPool2d``'s state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.requires_grad and torch.is_grad_enabled()) or min(x.shape[-2:]) < 2:  # < 2: max_pool2d's error
            return nn.functional.max_pool2d(x, 2)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        x = x[..., :h, :w]
        return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                             torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


class _Encoder(nn.Module):
    modality: str = ""
    n_tokens: int = 4
    raw_ndim: int = 0

    def __init__(self, d_enc: int = D_ENC) -> None:
        super().__init__()
        self.d_enc = d_enc

    def config(self) -> dict:
        return {"class": type(self).__name__, "modality": self.modality, "d_enc": self.d_enc,
                "n_tokens": self.n_tokens}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == self.raw_ndim
        if single:
            x = x.unsqueeze(0)
        out = self.encode(x.float())
        return out[0] if single else out

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ImageEncoder(_Encoder):
    """[3, 32, 32] -> 4 tokens: a conv stack, then 2x2 average pooling (one token per quadrant)."""

    modality, n_tokens, raw_ndim = "image", 4, 3

    def __init__(self, d_enc: int = D_ENC) -> None:
        super().__init__(d_enc)
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), MaxPool2x2(),
            nn.Conv2d(32, 48, 3, padding=1), nn.GELU(), MaxPool2x2(),
            nn.Conv2d(48, d_enc, 3, padding=1), nn.GELU(), nn.AdaptiveMaxPool2d(2))
        self.out = nn.Linear(d_enc, d_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x).flatten(2).transpose(1, 2)  # [B, 4, d]
        return self.out(h)


class AudioEncoder(_Encoder):
    """[2048] waveform -> fixed log-magnitude STFT (64-point, hop 32) -> 1-D convs -> 4 time tokens."""

    modality, n_tokens, raw_ndim = "audio", 4, 1

    def __init__(self, d_enc: int = D_ENC) -> None:
        super().__init__(d_enc)
        self.register_buffer("window", torch.hann_window(64), persistent=False)
        self.net = nn.Sequential(
            nn.Conv1d(33, 64, 5, padding=2), nn.GELU(),
            nn.Conv1d(64, d_enc, 5, padding=2, stride=2), nn.GELU(), nn.AdaptiveMaxPool1d(4))
        self.out = nn.Linear(d_enc, d_enc)

    @staticmethod
    def front_end(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Fixed spectral front end: ``log(1 + |STFT|)``, [B, 33, frames]."""
        spec = torch.stft(x, n_fft=64, hop_length=32, window=window, return_complex=True, center=True)
        return torch.log1p(spec.abs())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        s = self.front_end(x, self.window)
        return self.out(self.net(s).transpose(1, 2))


class VideoEncoder(_Encoder):
    """[8, 3, 16, 16] -> per-frame conv features -> temporal conv (stride 2) -> 4 tokens."""

    modality, n_tokens, raw_ndim = "video", 4, 4

    def __init__(self, d_enc: int = D_ENC) -> None:
        super().__init__(d_enc)
        self.frame = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), MaxPool2x2(),
            nn.Conv2d(32, 48, 3, padding=1), nn.GELU(), nn.AdaptiveMaxPool2d(2))
        self.temporal = nn.Sequential(nn.Conv1d(48 * 4, d_enc, 2, stride=2), nn.GELU())
        self.out = nn.Linear(d_enc, d_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        f = self.frame(x.reshape(b * t, *x.shape[2:])).reshape(b, t, -1)  # [B, T, 192]
        return self.out(self.temporal(f.transpose(1, 2)).transpose(1, 2))


class PointEncoder(_Encoder):
    """[192, 6] xyz+rgb -> local grouping: points binned into a 4x4 grid on the ground plane, a
    shared point MLP on (offset to the cell centre, rgb), max-pooled per cell; then a conv over the
    grid and 2x2 pooling -> 4 tokens."""

    modality, n_tokens, raw_ndim = "point", 4, 2
    grid = 4

    def __init__(self, d_enc: int = D_ENC) -> None:
        super().__init__(d_enc)
        self.point_mlp = nn.Sequential(nn.Linear(6, 48), nn.GELU(), nn.Linear(48, 64), nn.GELU())
        self.conv = nn.Sequential(nn.Conv2d(64, d_enc, 3, padding=1), nn.GELU(), nn.AdaptiveMaxPool2d(2))
        self.out = nn.Linear(d_enc, d_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid
        xy = x[..., :2].clamp(-0.999, 0.999)
        cell = ((xy + 1) / 2 * g).floor().long()  # [B, N, 2]
        idx = (g - 1 - cell[..., 1]) * g + cell[..., 0]  # row-major, top row first
        centre = torch.stack([(cell[..., 0].float() + 0.5) / g * 2 - 1, (cell[..., 1].float() + 0.5) / g * 2 - 1], -1)
        local = torch.cat([(xy - centre) * g, x[..., 2:3] * g, x[..., 3:]], -1)
        h = self.point_mlp(local)  # [B, N, 64]
        b, n, c = h.shape
        pooled = torch.full((b, g * g, c), -1e4, dtype=h.dtype)
        pooled = pooled.scatter_reduce(1, idx.unsqueeze(-1).expand(-1, -1, c), h, reduce="amax", include_self=True)
        pooled = torch.where(pooled < -1e3, torch.zeros_like(pooled), pooled)
        grid = pooled.transpose(1, 2).reshape(b, c, g, g)
        return self.out(self.conv(grid).flatten(2).transpose(1, 2))


class CapabilityEncoder(_Encoder):
    """Capability-family vision encoder: [3, 32, 32] -> 16 patch tokens (a 4x4 grid of 8x8 patches).

    Each token sums a convolutional feature of its neighbourhood (shapes, objects across patch
    borders) and a ViT-style embedding of its own patch's pixels (fine detail such as a glyph,
    which three max-pools blur away)."""

    modality, n_tokens, raw_ndim = "image", 16, 3

    def __init__(self, d_enc: int = D_ENC) -> None:
        super().__init__(d_enc)
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), MaxPool2x2(),
            nn.Conv2d(32, 48, 3, padding=1), nn.GELU(), MaxPool2x2(),
            nn.Conv2d(48, d_enc, 3, padding=1), nn.GELU(), MaxPool2x2())
        self.patch = nn.Sequential(nn.Linear(3 * 8 * 8, 2 * d_enc), nn.GELU(), nn.Linear(2 * d_enc, d_enc))
        self.pos = nn.Parameter(torch.zeros(16, d_enc))
        self.out = nn.Linear(d_enc, d_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, 32, 32] -> [B, 16, d]
        pixels = x.reshape(x.shape[0], 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], 16, 192)
        return self.out(self.net(x).flatten(2).transpose(1, 2) + self.patch(pixels) + self.pos)


ENCODER_CLASSES: dict[str, type[_Encoder]] = {
    c.__name__: c for c in (ImageEncoder, AudioEncoder, VideoEncoder, PointEncoder, CapabilityEncoder)}
MODALITY_ENCODERS: dict[str, type[_Encoder]] = {
    "image": ImageEncoder, "audio": AudioEncoder, "video": VideoEncoder, "point": PointEncoder}


class Projector(nn.Module):
    """Linear projector ``d_enc -> hidden`` (short and linear, so the LLM must learn to read it)."""

    def __init__(self, in_dim: int, out_dim: int, modality: str = "") -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.modality = in_dim, out_dim, modality
        self.proj = nn.Linear(in_dim, out_dim)

    def config(self) -> dict:
        return {"class": "Projector", "in_dim": self.in_dim, "out_dim": self.out_dim, "modality": self.modality}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Tower(nn.Module):
    """Encoder (frozen) + projector: one raw input -> ``[n_tokens, hidden]`` (batched inputs too)."""

    supports_batch = True

    def __init__(self, encoder: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


class FeatureTower(nn.Module):
    """A projector used on pre-computed encoder features (training on cached features)."""

    supports_batch = True

    def __init__(self, projector: nn.Module) -> None:
        super().__init__()
        self.projector = projector

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.projector(feats)


def save_module(module: nn.Module, config: dict, folder: str | Path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``folder`` (temp names, then rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / "model.safetensors")
    tmpc = folder / "config.json.tmp"
    tmpc.write_text(json.dumps(config, indent=2))
    tmpc.replace(folder / "config.json")
    return folder


def _read(folder: Path) -> tuple[dict, dict]:
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(f"missing {p}")
    return json.loads(cfg_path.read_text()), load_file(str(w_path))


def load_encoder(folder: str | Path) -> _Encoder:
    """Load a frozen encoder saved by :func:`save_module` (eval mode, no grad)."""
    cfg, state = _read(Path(folder))
    cls = ENCODER_CLASSES.get(cfg.get("class", ""))
    if cls is None:
        raise ValueError(f"{folder}/config.json: unknown encoder class {cfg.get('class')!r}")
    enc = cls(cfg["d_enc"])
    enc.load_state_dict(state)
    enc.eval().requires_grad_(False)
    return enc


def load_projector(folder: str | Path) -> Projector:
    cfg, state = _read(Path(folder))
    p = Projector(cfg["in_dim"], cfg["out_dim"], cfg.get("modality", ""))
    p.load_state_dict(state)
    return p


def raw_shape(modality: str) -> tuple[int, ...]:
    return RAW_SHAPES[modality]
