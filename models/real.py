"""Real third-party ONNX models shipped inside PyPI packages, and feeds like the ones they were trained on.

The models come from packages installed with ``pip install --no-deps rapidocr-onnxruntime ddddocr silero-vad``
(the packages are never imported: their files are found with `importlib.util.find_spec`). A text detector fed
random noise answers with an all-zero map and every comparison on it is meaningless, so each model gets inputs
of its own kind, rendered here with Pillow:

========== ====================================================================================================
name       model and its feeds
========== ====================================================================================================
ppocr_det  PP-OCRv4 text detector: 640x640 pages of text lines (several fonts and sizes), ImageNet mean/std
ppocr_rec  PP-OCRv4 CTC recognizer: one text line at height 48, aspect kept, padded to 320, ``(x/255-0.5)/0.5``
ppocr_cls  PP-OCR mobile 0/180 degree classifier: the same crops at 3x48x192, every second one upside down
dddd_ocr   ddddocr ``common.onnx`` (SiLU CNN + ONNX LSTM, dynamic width): captcha-like text, grey, height 64
dddd_det   ddddocr ``common_det.onnx`` (YOLOX-style, 416x416): click-captcha pictures letterboxed with 114, BGR
dddd_old   ddddocr ``common_old.onnx``, already dynamically quantized: the ``dddd_ocr`` feeds
silero     Silero VAD (its layers inside ``If`` bodies): 64+512-sample chunks of speech-like audio and noise at
           16 kHz, with the recurrent state a streaming run reaches there
silero_op15 Silero VAD 16 kHz, opset 15 (convolutions in the main graph): the same chunks
========== ====================================================================================================

``python -m models.real OUT_DIR [NAME ...]`` writes ``OUT_DIR/NAME/{calib,held}/NNN.npz`` (one feed per file,
the form ``--calib``/``--data`` take for models whose inputs are not all batched on their first axis).
"""

from __future__ import annotations

import importlib.util
import random
import string
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["MODELS", "available", "model_path", "feeds", "write_feeds", "build"]

# name -> (package, path inside the package)
MODELS: dict[str, tuple[str, str]] = {
    "ppocr_det": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocr_rec": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"),
    "ppocr_cls": ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "dddd_ocr": ("ddddocr", "common.onnx"),
    "dddd_det": ("ddddocr", "common_det.onnx"),
    "dddd_old": ("ddddocr", "common_old.onnx"),
    "silero": ("silero_vad", "data/silero_vad.onnx"),
    "silero_op15": ("silero_vad", "data/silero_vad_16k_op15.onnx"),
}

_FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSerif-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationMono-Regular.ttf",
)
_WORDS = (
    "the quick brown fox jumps over lazy dog invoice total amount date number street city phone model "
    "compression quantize runtime order price customer account balance payment receipt January March 2024 "
    "12.50 $39.99 No. 4711 ID:8832 tel +49 30 1234 www.example.com Hello World OCR test sample line text page"
).split()
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_SAMPLE_RATE = 16000


def model_path(name: str) -> Path | None:
    """The file of real model `name`, or None when its package is not installed."""
    package, inner = MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    return path if path.is_file() else None


def available() -> dict[str, Path]:
    """Every real model whose package is installed, by name."""
    return {name: p for name in MODELS if (p := model_path(name)) is not None}


# ------------------------------------------------------------------------------ text rendering
def _font(rng: random.Random, size: int):  # noqa: ANN202 - a Pillow font
    from PIL import ImageFont

    files = [f for f in _FONT_FILES if Path(f).is_file()]
    if files:
        return ImageFont.truetype(rng.choice(files), size)
    return ImageFont.load_default(size=size)


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def _text_page(rng: random.Random, size: int = 640):  # noqa: ANN202
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    y = rng.randint(5, 30)
    while y < size - 20:
        fs = rng.choice([14, 18, 22, 28, 36, 48])
        shade = rng.choice([0, 0, 0, 40, 90])
        draw.text((rng.randint(5, 120), y), _sentence(rng, 2, 8), fill=(shade,) * 3, font=_font(rng, fs))
        y += int(fs * rng.uniform(1.3, 2.6))
    return img


def _text_crop(rng: random.Random):  # noqa: ANN202
    from PIL import Image, ImageDraw

    font = _font(rng, rng.choice([20, 26, 32, 40, 48]))
    text = _sentence(rng, 1, 4)
    box = font.getbbox(text)
    tw, th = box[2] - box[0], box[3] - box[1]
    w, h = tw + 2 * rng.randint(2, 8), th + 2 * rng.randint(2, 8)
    bg, fg = rng.randint(215, 255), rng.randint(0, 60)
    img = Image.new("RGB", (w, h), (bg,) * 3)
    ImageDraw.Draw(img).text(((w - tw) // 2 - box[0], (h - th) // 2 - box[1]), text, fill=(fg,) * 3, font=font)
    return img


def _line_input(img, height: int, width: int) -> np.ndarray:  # noqa: ANN001
    """PaddleOCR's recognizer input: aspect kept at `height`, capped at `width`, zero-padded, (x-0.5)/0.5."""
    from PIL import Image

    w = max(1, min(width, int(np.ceil(height * img.width / img.height))))
    a = np.asarray(img.resize((w, height), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :w] = (a - 0.5) / 0.5
    return out[None]


def _captcha(rng: random.Random):  # noqa: ANN202
    from PIL import Image, ImageDraw

    w, h = rng.choice([(120, 40), (160, 60), (150, 50), (200, 64), (100, 38)])
    img = Image.new("RGB", (w, h), tuple(rng.randint(170, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(60, 200)):
        draw.point((rng.randrange(w), rng.randrange(h)), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    chars = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(4, 6)))
    step = w / (len(chars) + 0.5)
    for i, c in enumerate(chars):
        fs = int(h * rng.uniform(0.55, 0.85))
        tile = Image.new("RGBA", (fs + 10, fs + 10), (0, 0, 0, 0))
        colour = tuple(rng.randint(0, 140) for _ in range(3)) + (255,)
        ImageDraw.Draw(tile).text((5, 0), c, font=_font(rng, fs), fill=colour)
        tile = tile.rotate(rng.uniform(-30, 30), resample=Image.BICUBIC)
        img.paste(tile, (int(step * (i + 0.25)) + rng.randint(-3, 3), rng.randint(0, max(1, h - fs - 8))), tile)
    for _ in range(rng.randint(1, 4)):
        draw.line([(rng.randrange(w), rng.randrange(h)), (rng.randrange(w), rng.randrange(h))],
                  fill=tuple(rng.randint(0, 200) for _ in range(3)), width=rng.randint(1, 2))
    return img


def _captcha_input(img) -> np.ndarray:  # noqa: ANN001
    """ddddocr's own preprocessing: LANCZOS to height 64, grey, /255."""
    from PIL import Image

    width = int(img.size[0] * (64 / img.size[1]))
    grey = img.resize((width, 64), Image.LANCZOS).convert("L")
    return (np.asarray(grey, np.float32) / 255.0)[None, None]


def _click_captcha(rng: random.Random, size: int = 344):  # noqa: ANN202
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([rng.uniform(60, 200) + rng.uniform(-60, 60) * xx + rng.uniform(-60, 60) * yy
                     for _ in range(3)], -1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(5, 12)):
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randint(15, 80)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    for _ in range(rng.randint(3, 5)):
        fs = rng.randint(36, 60)
        tile = Image.new("RGBA", (fs + 16, fs + 16), (0, 0, 0, 0))
        colour = tuple(rng.randint(0, 255) for _ in range(3)) + (255,)
        stroke = (255, 255, 255, 255) if sum(colour[:3]) < 380 else (0, 0, 0, 255)
        ImageDraw.Draw(tile).text((8, 0), rng.choice(string.ascii_uppercase + string.digits), font=_font(rng, fs),
                                  fill=colour, stroke_width=2, stroke_fill=stroke)
        tile = tile.rotate(rng.uniform(-40, 40), resample=Image.BICUBIC)
        img.paste(tile, (rng.randint(0, size - fs - 16), rng.randint(0, size - fs - 16)), tile)
    return img


def _letterbox_input(img, size: int = 416) -> np.ndarray:  # noqa: ANN001
    """ddddocr's detector preprocessing: BGR, resized into size x size, padded with 114, float 0..255, CHW."""
    from PIL import Image

    bgr = np.ascontiguousarray(np.asarray(img)[..., ::-1])
    r = min(size / bgr.shape[0], size / bgr.shape[1])
    nh, nw = int(bgr.shape[0] * r), int(bgr.shape[1] * r)
    padded = np.full((size, size, 3), 114, np.uint8)
    padded[:nh, :nw] = np.asarray(Image.fromarray(bgr).resize((nw, nh), Image.BILINEAR))
    return padded.transpose(2, 0, 1)[None].astype(np.float32)


# ------------------------------------------------------------------------------ audio
def _speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Voiced harmonics shaped by three formants, syllable envelopes and pauses, plus a little noise."""
    n = int(_SAMPLE_RATE * seconds)
    t = np.arange(n) / _SAMPLE_RATE
    f0 = rng.uniform(90, 240) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
    phase = 2 * np.pi * np.cumsum(f0) / _SAMPLE_RATE
    formants = rng.uniform([500, 1200, 2400], [900, 2000, 3200])
    x = np.zeros(n)
    for k in range(1, 30):
        fk = k * f0.mean()
        if fk > 7000:
            break
        x += (sum(np.exp(-((fk - f) / 180.0) ** 2) for f in formants) + 0.05 / k) * np.sin(k * phase)
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6)), 0, None) ** 1.5
    pauses = np.ones(n)
    for _ in range(int(seconds)):
        s = int(rng.integers(0, n))
        pauses[s : s + int(_SAMPLE_RATE * rng.uniform(0.15, 0.5))] = 0.0
    y = x * syllables * pauses
    y = y / (np.abs(y).max() + 1e-9) * rng.uniform(0.1, 0.7)
    return (y + rng.standard_normal(n) * rng.uniform(0.002, 0.03)).astype(np.float32)


def _noise(rng: np.random.Generator, seconds: float) -> np.ndarray:
    w = rng.standard_normal(int(_SAMPLE_RATE * seconds))
    if rng.random() < 0.5:  # pink-ish
        w = np.cumsum(w)
        w -= np.convolve(w, np.ones(200) / 200, mode="same")
    return (w / np.abs(w).max() * rng.uniform(0.005, 0.2)).astype(np.float32)


def _silero_feeds(path: Path, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Chunks with the state a streaming run reaches: run the model over each signal, keep a few steps."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    out: list[dict[str, np.ndarray]] = []
    k = 0
    while len(out) < n:
        signal = _speech_like(rng, 3.0) if k % 3 != 2 else _noise(rng, 3.0)
        if k % 3 == 1:
            signal = signal + _noise(rng, 3.0)
        k += 1
        frames = signal[: (len(signal) // 512) * 512].reshape(-1, 512)
        keep = set(rng.choice(np.arange(4, len(frames)), size=2, replace=False).tolist())
        state, context = np.zeros((2, 1, 128), np.float32), np.zeros((1, 64), np.float32)
        for i, frame in enumerate(frames):
            x = np.concatenate([context, frame[None]], 1).astype(np.float32)
            feed = {k2: v for k2, v in {"input": x, "state": state, "sr": np.array(_SAMPLE_RATE, np.int64)}.items()
                    if k2 in names}
            if i in keep and len(out) < n:
                out.append({name: v.copy() for name, v in feed.items()})
            _, state = sess.run(None, feed)
            context = x[:, -64:]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


# ------------------------------------------------------------------------------ feeds
def _image_feeds(name: str, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = random.Random(seed)
    makers: dict[str, Callable[[int], dict[str, np.ndarray]]] = {
        "ppocr_det": lambda _: {"x": ((np.asarray(_text_page(rng), np.float32) / 255.0 - _IMAGENET_MEAN)
                                      / _IMAGENET_STD).transpose(2, 0, 1)[None].astype(np.float32)},
        "ppocr_rec": lambda _: {"x": _line_input(_text_crop(rng), 48, 320)},
        "ppocr_cls": lambda i: {"x": _line_input(_text_crop(rng).rotate(180 * (i % 2)), 48, 192)},
        "dddd_ocr": lambda _: {"input1": _captcha_input(_captcha(rng))},
        "dddd_old": lambda _: {"input1": _captcha_input(_captcha(rng))},
        "dddd_det": lambda _: {"images": _letterbox_input(_click_captcha(rng))},
    }
    return [makers[name](i) for i in range(n)]


def feeds(name: str, n: int, *, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`n` feeds for real model `name` (see the module docstring), reproducible from `seed`."""
    if name not in MODELS:
        raise KeyError(f"unknown real model '{name}' (known: {', '.join(MODELS)})")
    if name.startswith("silero"):
        path = model_path(name)
        if path is None:
            raise FileNotFoundError(f"{name}: its package is not installed")
        return _silero_feeds(path, n, seed)
    return _image_feeds(name, n, seed)


def write_feeds(folder: Path, items: list[dict[str, np.ndarray]]) -> Path:
    """One ``NNN.npz`` per feed in `folder` (created), the form ``--calib``/``--data`` read as a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(items):
        np.savez(folder / f"{i:03d}.npz", **feed)
    return folder


def build(name: str, out: Path, *, calib: int = 16, held: int = 6, seed: int = 0) -> tuple[Path, Path]:
    """Write `calib` calibration and `held` held-out feeds (never the same inputs) under ``out/name``."""
    items = feeds(name, calib + held, seed=seed)
    return write_feeds(out / name / "calib", items[:calib]), write_feeds(out / name / "held", items[calib:])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m models.real OUT_DIR [NAME ...]")
    target = Path(sys.argv[1])
    for model_name in sys.argv[2:] or list(available()):
        c, h = build(model_name, target)
        print(f"{model_name}: {c} and {h}")
