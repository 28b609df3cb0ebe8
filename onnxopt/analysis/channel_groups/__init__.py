"""Channel dependency groups: which channels of which tensors must be removed together.

Every tracked tensor has one *channel space*: an axis of a value (``conv.out`` axis 1, a MatMul
output's last axis, the head axis of ``[batch, seq, heads, dim]``). Each index of a space is an
*element*; a union-find over all elements joins the indices that must go together. One walk over
the graph in topological order applies one rule per op (the table ``RULES``):

- producers (Conv, ConvTranspose, Gemm, MatMul with a constant weight) start a fresh space for
  their output and record which weight axis (and bias) it indexes;
- consumers (the same ops) end the space of their input and record the weight axis indexed by it;
- pass-through ops (BatchNorm, activations, pooling, Pad, Resize, Dropout, Identity, Cast, per
  channel Add/Sub/Mul/Div with sliced constants, InstanceNorm, LayerNorm over other axes) join each
  output index to the same input index;
- Add/Sum/Mul/Max/Min between tracked branches join all inputs; Concat maps each input to its
  offset range; Split/Slice map ranges back; Transpose/Squeeze/Unsqueeze move the axis; Flatten and
  Reshape map a channel to its block (``c -> c*S .. c*S+S-1``) or a block of channels to one index
  (``32 -> 4 heads x 8``: head ``h`` joins channels ``8h .. 8h+7``);
- grouped and depthwise Conv join the input channels of a group with that group's outputs;
- a MatMul between two activations joins their batch axes (attention heads);
- graph outputs, shape-consuming uses, subgraph captures and any op without a rule *pin* their
  elements (never removed), with the reason.

Worked example, ``Conv(1->4) -> BN(4) -> Relu -> Conv(4->8)``: spaces ``conv1.out``, ``bn.out`` and
``relu.out`` (4 elements each); index ``c`` of the three forms one *unit*; the four units touch the
same spaces and form one *group*. Removing unit ``c`` slices ``conv1.W[c]``, ``conv1.B[c]``, the BN
parameters ``[c]`` and ``conv2.W[:, c]``.

Each element also carries the constant its tensor holds when the producer's filter is all zero
(``bias`` at the producer, then pushed through the pass-through ops: ``relu(bias)``); NaN when not
constant. Bias compensation folds this constant into the consumers.

Modules: `spaces` (the records: spaces, producers, consumers, parameter slices, fixups, groups),
`graph` (`ChannelGraph`: the union-find over elements, the walk, groups and keep masks), `rules`
(the op-type -> rule table), and the rules by kind: `weights` (Conv, ConvTranspose, Gemm, MatMul),
`passthrough` (activations, normalizations, element-wise and reducing ops), `index_maps` (Concat,
Split, Slice, Transpose, Squeeze/Unsqueeze, Flatten, Reshape, Shape); `_operands` reads the
operands (ranks, constant ints and weights) every rule needs.
"""

from __future__ import annotations

from onnxopt.analysis.channel_groups.graph import ChannelGraph, build_channel_graph
from onnxopt.analysis.channel_groups.spaces import Consumer, Fixup, Group, ParamSlice, Producer, Space

__all__ = ["Space", "Producer", "Consumer", "ParamSlice", "Fixup", "Group", "ChannelGraph", "build_channel_graph"]
