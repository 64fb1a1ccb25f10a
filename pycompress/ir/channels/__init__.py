"""Coupled channel groups: which channels must be pruned together (ALGORITHMS.md 1.4).

Removing output channel ``c`` of a Conv / Gemm / MatMul (a *producer*) must
remove input channel ``c`` of every layer that reads it (a *consumer*), the
matching per-channel parameters of everything in between (BatchNormalization,
depthwise Conv filters, per-channel constants), and the same channel of every
other producer whose output is added to it (residuals couple producers). Such
a set of channels is a *group*; a pruning decision keeps ``k`` of its
``width`` channels.

How it is computed. Every output channel of every producer is an *element*.
Each activation tensor that carries channels on one axis gets a *layout*: for
each position along that axis, the element there (``-1``: a channel no
producer owns, e.g. from a graph input; it is never pruned). Walking the
graph in topological order, each op maps its inputs' layouts to its
outputs': pass-through ops copy the layout, Concat concatenates layouts (so
channel offsets come for free), Flatten / Reshape into features repeat each
element over its ``H*W`` block, and elementwise ops between two carriers
unite their elements position by position (union-find). A group is a set of
producers connected through united elements; its channels are the
union-find classes, numbered in the order of the group's producers' channels.

Anything on the channel axis that the walk does not know to keep channels
aligned (Transpose moving it, Softmax over it, Gather / Slice / Split on it,
graph outputs, unknown ops, ...) blocks the elements it carries: the group is
reported with the node that blocked it and why. Nothing is guessed.

Reading it (e.g. for PFA, which measures responses per channel)::

    for group in channel_groups(model):
        if not group.prunable:
            print(group.id, group.blocked_by)
            continue
        group.width                    # number of channels a decision chooses from
        group.producer_outputs         # tensor names holding the group's channels
        p = group.producers[0]         # p.output (tensor name), p.axis (channel axis),
        p.channels                     # p.channels[i] = group channel of p's output channel i

``keep_indices`` in a plan are group channel numbers (``0 .. width-1``). For a
group with one producer, or several aligned ones (residual Add), group
channel ``i`` is output channel ``i`` of each producer.

The package, one concept per module:

- ``model``: the records above (``ChannelGroup`` and its members) and the walk's
  bookkeeping (``Layout``, the ``Elements`` union-find).
- ``walk``: the pass over the graph; dispatches each node to its rule, blocks what the
  rule leaves, turns ``MalformedNode`` into "could not be analysed (...)".
- ``rules``: ONE table ``RULES`` from op type to a small rule function; a new op goes here.
- ``shapes``: the static shape evaluator (``shape_entries``), usable on its own.
- ``nodes``: reading node inputs/attributes, raising ``MalformedNode`` on a malformed node.
- ``groups``: walk records -> ``ChannelGroup``s; ``channel_groups`` / ``channel_group`` (cached).
- ``reuse``: the cached groups kept valid after a prune, without a walk.
"""

from pycompress.ir.channels.groups import channel_group, channel_groups
from pycompress.ir.channels.model import (
    ChannelCarrier,
    ChannelCount,
    ChannelGroup,
    ChannelProducer,
    ChannelSlice,
)
from pycompress.ir.channels.shapes import shape_entries

__all__ = ["ChannelCarrier", "ChannelCount", "ChannelGroup", "ChannelProducer", "ChannelSlice",
           "channel_group", "channel_groups", "shape_entries"]
