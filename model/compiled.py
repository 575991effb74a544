"""torch.compile with a fallback to eager, for the fused losses and the compiled decode step."""

import logging

import torch

log = logging.getLogger(__name__)


def mark_sizes_dynamic(marks: list[tuple[torch.Tensor, int]]):
    """Make each size (tensor, dim) in `marks` a torch.compile symbol, so that a call with another
    value of it reuses the compiled graph. Sizes below 2 stay unmarked, because torch.compile always
    specialises 0 and 1."""
    for tensor, dim in marks:
        if tensor.shape[dim] >= 2:
            torch._dynamo.mark_dynamic(tensor, dim)


class MaybeCompiled:
    """A function run through torch.compile(dynamic=True), falling back to eager (with one
    warning) where compilation is unavailable or fails. `options` go to torch.compile's inductor
    backend.

    Python floats that the function reads (a sampling temperature, a norm's epsilon) are compiled
    in as constants, so a new value compiles again. torch.compile's default instead made each one a
    graph input, and where no tensor used the float (top_p when there is no nucleus truncation,
    nn.Embedding's norm_type), it fixed the value and traced the whole function a second time: 9 of
    the 42 s that a first compilation of the decode step took, with an empty inductor cache.

    Past torch._dynamo.config.recompile_limit graphs for one function (8 by default), dynamo
    itself runs further shapes eagerly, with torch's warning and not this one.

    NOTE: only errors raised during the call fall back. Where torch compiles a backward graph
    later (in loss.backward()), its failure raises there."""

    def __init__(self, fn, **options):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True, options=options or None)
        self.enabled = True

    def __call__(self, *args):
        if self.enabled:
            try:
                with torch._dynamo.config.patch(specialize_float=True):
                    return self.compiled(*args)
            except Exception as e:  # compiler missing or unsupported op: eager computes the same function
                # Eager runs first. Where it fails too, the inputs are at fault, so its error propagates
                # and compilation stays on.
                result = self.fn(*args)
                log.warning("torch.compile failed for %s, using eager: %s", self.fn.__name__, e)
                self.enabled = False
                return result
        return self.fn(*args)
