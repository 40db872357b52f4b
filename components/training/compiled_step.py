"""A training iteration's decoder rounds (prompt encoding, mask decoding and the loss), eager or compiled.

Why compile: an eager round is ~1,500 operator calls (forward and autograd backward), about a third of its
CPU time autocast casts and elementwise passes that Inductor fuses, and on a GPU each call is a kernel
launch. `torch.compile` turns the round's forward and loss into one graph and AOTAutograd its backward
into another; on CUDA `mode="reduce-overhead"` also replays them as CUDA graphs (not measured: no GPU was
lent when this was written, so CUDA stays eager by default, see config.TrainConfig.compile).

Static shapes: Inductor failed with `dynamic=True` over the varying object count (a stride assertion in
the backward, torch 2.14.1), and a graph per object count would compile up to 25 graphs per prompt
layout. So the objects of a step are padded to the next power of two (`padded_size`): 1, 2, 4, 8, 16,
32. The padding rows repeat the step's first object (finite, valid prompts) and carry weight 0 in the
loss, so they add exactly zero to the loss and to every gradient; the real objects' numbers do not
depend on them (every decoder operation is per object, and the shared first-layer image projections
are computed per image, before any object is involved). A run compiles one graph pair per (padded
size, prompt layout) it meets: first rounds, later rounds without and with a mask prompt.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from components.sam.losses import multi_output_loss
from components.sam.prompt_batch import choose_output, decode_all, decode_groups, is_ambiguous
from components.training.config import AmpSettings

log = logging.getLogger(__name__)

# Per (padded size, token count, mask prompt, several images) one graph pair; 6 sizes x 3 prompt layouts
# x 2 is the most a run at the seed's settings can meet. Dynamo's default limit (8) would fall back
# to eager silently past it.
_RECOMPILE_LIMIT = 64


def padded_size(n: int) -> int:
    """The object count a compiled step runs at: the next power of two (at most 2x the work, and a
    handful of distinct graphs)."""
    return 1 << max(0, n - 1).bit_length()


def _pad_rows(x: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """(N, ...) -> (size, ...): rows after N repeat row 0."""
    if x is None or x.shape[0] == size:
        return x
    return torch.cat([x, x[:1].expand(size - x.shape[0], *x.shape[1:])])


def pad_batch(b, size: int):
    """A trainer Batch with its objects padded to `size` (see the module docstring); no-op at N == size."""
    return dataclasses.replace(b, coords=_pad_rows(b.coords, size), labels=_pad_rows(b.labels, size),
                               target=_pad_rows(b.target, size), valid=_pad_rows(b.valid, size),
                               image_index=_pad_rows(b.image_index, size))


def object_weights(n: int, size: int, scale: float, device: torch.device) -> torch.Tensor:
    """(size,) per-object loss weights: `scale` for the N real objects, 0 for the padding. A tensor, not
    a Python number, so a compiled graph does not specialise on N."""
    w = torch.zeros(size, dtype=torch.float32)
    w[:n] = scale
    return w.to(device, non_blocking=True)


def round_forward(model: torch.nn.Module, amp: AmpSettings, device: torch.device, embeddings: torch.Tensor,
                  image_index: torch.Tensor | None, coords: torch.Tensor, labels: torch.Tensor,
                  mask_input: torch.Tensor | None, target: torch.Tensor, valid: torch.Tensor, groups=None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prompting round, one decoder call: ((N,) loss per object, (N, 4, 256, 256) logits, (N,) the
    output the next round builds on: the one inference would pick, see prompt_batch.choose_output)."""
    ambiguous = is_ambiguous(labels)
    with amp.autocast(device):
        if groups is None:
            low, iou = decode_all(model, embeddings, image_index, coords, labels, mask_input)
        else:
            low, iou = decode_groups(model, embeddings, image_index, coords, labels, mask_input, groups)
    return multi_output_loss(low, iou, target, valid, ambiguous), low, choose_output(iou.detach(), ambiguous)


class DecoderRound:
    """`round_forward` bound to a model, eager or through torch.compile (static shapes, one graph pair
    per shape met; rounds with `groups`, i.e. several points per object, stay eager)."""

    def __init__(self, model: torch.nn.Module, amp: AmpSettings, device: torch.device, compiled: bool,
                 backend: str = "inductor"):
        if compiled and amp.enabled and device.type == "cpu":
            # Inductor's CPU code for these rounds under bf16 autocast gave a non-finite loss at every
            # step where eager gives finite ones (torch 2.14.1, benchmarks/RESULTS.md): eager instead.
            log.warning("compiled decoder rounds under CPU autocast are not trusted yet; running eager")
            compiled = False
        self.model, self.amp, self.device, self.compiled = model, amp, device, compiled
        self.shapes_compiled: dict[tuple, float] = {}  # shape key -> seconds its first call took
        self._compiled_fn = None
        if compiled:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
            # CUDA graphs on a GPU: a step there is bound by kernel launches. Not available on CPU.
            mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
            # fullgraph: a graph break would silently split the round into eager pieces.
            self._compiled_fn = torch.compile(self._forward, backend=backend, mode=mode, dynamic=False,
                                              fullgraph=True)

    def _forward(self, embeddings, image_index, coords, labels, mask_input, target, valid):
        return round_forward(self.model, self.amp, self.device, embeddings, image_index, coords, labels,
                             mask_input, target, valid)

    def __call__(self, embeddings, image_index, coords, labels, mask_input, target, valid, groups=None):
        if self._compiled_fn is None or groups is not None:
            return round_forward(self.model, self.amp, self.device, embeddings, image_index, coords, labels,
                                 mask_input, target, valid, groups)
        key = (tuple(embeddings.shape), image_index is None, tuple(coords.shape), mask_input is None)
        if self.device.type == "cuda":
            # CUDA graphs reuse their output memory on the next replay: nothing of a round's outputs is
            # read after the next round starts (the trainer keeps only what it derived from them).
            torch.compiler.cudagraph_mark_step_begin()
        if key in self.shapes_compiled:
            return self._compiled_fn(embeddings, image_index, coords, labels, mask_input, target, valid)
        t0 = time.perf_counter()
        out = self._compiled_fn(embeddings, image_index, coords, labels, mask_input, target, valid)
        self.shapes_compiled[key] = time.perf_counter() - t0
        log.info("compiled a decoder round for %d objects, %d tokens%s in %.1f s", coords.shape[0],
                 coords.shape[1], ", mask prompt" if mask_input is not None else "", self.shapes_compiled[key])
        return out
