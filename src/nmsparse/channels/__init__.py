"""Channels: which channels of a network are coupled, and what can be done with them.

    from nmsparse.channels import channel_graph, permute_for_nm
    groups = channel_graph(model, example_input)   # list of ChannelGroup
    report = permute_for_nm(model, groups, "2:4")  # same function, more |w| kept by 2:4

:func:`channel_graph` traces a model by running it once (see :mod:`.trace`);
:class:`ChannelGroup` lists the tensor slices that index one run of coupled channels
(:mod:`.groups`).
"""

from .groups import ChannelGroup, Slice, check_groups, permute_group
from .permute import PermutationReport, permute_for_nm
from .slim import kept_count, mask_channels, slim, why_not_slimmable
from .trace import TraceError, channel_graph

__all__ = ["ChannelGroup", "PermutationReport", "Slice", "TraceError", "channel_graph",
           "check_groups", "kept_count", "mask_channels", "permute_for_nm", "permute_group",
           "slim", "why_not_slimmable"]
from .chex import Chex, allocate, leverage_scores, projection_residuals  # noqa: E402

__all__ += ["Chex", "allocate", "leverage_scores", "projection_residuals"]
