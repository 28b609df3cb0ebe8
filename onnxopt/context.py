"""What a pass may need besides the model: calibration data, the original model, activations."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt.data import Dataset
from onnxopt.errors import UsageError
from onnxopt.progress import progress
from onnxopt.runtime import run_taps

__all__ = ["Context"]


@dataclasses.dataclass
class Context:
    """Shared by the passes of one pipeline run.

    ``original_path`` is a file of the model as it was before the first pass (the teacher for
    distillation, the reference for validation); ``calib`` the checked calibration feeds.
    """

    original_path: Path | None = None
    calib: Dataset | None = None
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    tolerance: float | None = None
    threads: int | None = None
    _original: ir.Model | None = dataclasses.field(default=None, repr=False, compare=False)

    def require_calib(self, who: str, hint: str = "") -> Dataset:
        if self.calib is None or len(self.calib) == 0:
            extra = f" ({hint})" if hint else ""
            raise UsageError(f"{who} needs calibration data: give --calib DATA (e.g. random:32){extra}")
        return self.calib

    def activations(
        self,
        model: ir.Model,
        names: Sequence[str],
        *,
        feeds: Dataset | None = None,
        desc: str = "calibrating",
    ) -> Iterator[dict[str, np.ndarray]]:
        """Stream the named tensors of the *current* model, one dict per calibration feed."""
        data = feeds if feeds is not None else self.require_calib(desc)
        yield from progress(run_taps(model, names, data, threads=self.threads), desc=desc, total=len(data))

    def original_model(self) -> ir.Model:
        """The model as it was before the pipeline (loaded once, lazily, shapes inferred)."""
        if self.original_path is None:
            raise UsageError("the original model is not available to this pass")
        if self._original is None:
            from onnxopt.analysis.stats import infer_shapes
            from onnxopt.io import load

            self._original = load(self.original_path, check=False)
            infer_shapes(self._original)
        return self._original

    def original_activations(
        self, names: Sequence[str], *, feeds: Dataset | None = None, desc: str = "teacher"
    ) -> Iterator[dict[str, np.ndarray]]:
        """Stream the named tensors of the model as it was before the pipeline."""
        teacher = self.original_model()
        data = feeds if feeds is not None else self.require_calib(desc)
        yield from progress(run_taps(teacher, names, data, threads=self.threads), desc=desc, total=len(data))
