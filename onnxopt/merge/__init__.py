"""merge: ensembles, composition and weight averaging of several ONNX models in one graph.

``onnxopt merge A.onnx B.onnx [C.onnx ...] -o OUT --combine MODE``, and in Python `merge_models`
(the onnx_ir model and a `MergeReport`) or `merge` (the model in the kind it was given, optionally
written). merge is a library and a verb beside the passes, not a pass: it builds one new graph from
several models instead of rewriting one.

Combine modes. Parallel ensembles share the graph inputs (matched by name, renamed with an input
map) and combine each output name that several members produce; with members' outputs
``x_1 .. x_n`` of that name and normalized weights ``w_i = v_i / Σ v``:

- ``mean``      ``Sum(x_i) / n``
- ``weighted``  ``Sum(w_i · x_i)``
- ``max``       ``Max(x_i)`` elementwise
- ``softvote``  ``Sum(w_i · Softmax(x_i, axis))`` (equal weights unless given)
- ``vote``      hard voting on ``axis``: ``votes_c = #{i : argmax x_i = c}``; the winner is the
  most-voted class, ties broken by the largest ``Sum(x_i)``; the output is ``votes + 0.5 ·
  onehot(winner)``, so its argmax is the ensemble's class and its floor the vote counts
- ``concat``    ``Concat(x_i, axis)``
- ``stack``     ``Concat(Unsqueeze(x_i, 0), 0)``: a new leading member axis

An output produced by one member only passes through under its name. ``keep_members`` also
exposes each member's own outputs as ``<member>.<output>``.

``chain`` (sequential fusion) feeds each member's outputs into the next member's inputs: an
input map ``out=in`` names the pairs; without one, equal names connect, else a member with one
output feeds a member with one input. Inputs left unconnected become graph inputs; the graph
outputs are the last member's.

``soup`` (weight averaging) checks that every member has the first member's architecture node by
node (see `onnxopt.merge.soup`) and writes the first member with every float weight replaced by
``Σ w_i W_i``: one model's cost.

Hygiene: every member's node, value and initializer names get the prefix ``<member>.`` (member
names come from the file names or ``names``); shared inputs are reconciled (dtypes must be equal,
fixed dims must agree, a fixed dim wins over a symbolic one); default-domain opsets are raised to
the largest member opset (at least 13) with onnx's version converter, and an impossible
conversion is a clear error; custom domains are unioned (a version conflict is an error);
identical initializers are stored once (content hash); dead nodes are dropped; the IR version is
the largest needed; metadata ``onnxopt.merge`` records the mode, members and weights.
All modes except ``soup`` are exact: merged outputs equal the combination of the members run
separately, to float rounding.

Modules: `members` (loading, names, opsets, agreeing types, prefixes), `combine` (the graph of an
ensemble or a chain), `soup` (weight averaging), `api` (`merge_models`, `merge`), `verb` (the
command line). This package is callable: ``onnxopt.merge(models, combine=...)`` calls `merge`, as it
did when ``onnxopt.merge`` was a function.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

from onnxopt.merge.api import METADATA_KEY, MergeReport, merge, merge_models
from onnxopt.merge.combine import COMBINE_MODES, ENSEMBLE_MODES

__all__ = ["merge", "merge_models", "MergeReport", "COMBINE_MODES", "ENSEMBLE_MODES", "METADATA_KEY"]


class _CallableModule(types.ModuleType):
    """``onnxopt.merge`` is this package, and calling it calls `merge` (the name was a function first)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return merge(*args, **kwargs)


__signature__ = inspect.signature(merge)
sys.modules[__name__].__class__ = _CallableModule
