"""DDCL's cross-image pixel contrast on the trainer side: one module holding the projection head, the class-wise
memory queues and the supervised InfoNCE of :mod:`nnunetv2_cimis.losses.contrastive`.

The head reads the output of a module of the student network (a tap, e.g. ``decoder.stages.-1``); its input
channels are those of the tap module's last convolution. It is kept out of the network (inference stays plain
nnU-Net); its parameters join the optimizer in the trainer's ``configure_optimizers``. Used by
:class:`~nnunetv2_cimis.training.trainers.ddcl.nnUNetTrainerDDCL`.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.networks.taps import resolve_module
from nnunetv2_cimis.losses.common import resize_labels_nearest
from nnunetv2_cimis.losses.contrastive import ClassMemoryQueue, CrossImagePixelContrastLoss, ProjectionHead


def tap_channels(network: nn.Module, tap: str) -> int:
    """Output channels of the last convolution of the module at ``tap`` (the channels of its features)."""
    module = resolve_module(network, tap)
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d,
                                                           nn.ConvTranspose3d))]
    if not convs:
        raise CIMISError(f"The contrast tap module {type(module).__name__} has no convolution; choose another "
                         f"contrast_tap (e.g. 'decoder.stages.-1')")
    return convs[-1].out_channels


class PixelContrastTerm(nn.Module):
    """Projection head + class-wise queues + cross-image InfoNCE, for 2D features.

    Args:
        in_channels: channels of the tapped features. num_classes: label values 0 .. num_classes - 1.
        embedding_dim, queue_size, temperature, max_anchors_per_class, queue_pixels_per_image: as
            :class:`ProjectionHead`, :class:`ClassMemoryQueue`, :class:`CrossImagePixelContrastLoss`.

    ``forward(features (B, C, X, Y), labels (B, X', Y') int, logits (B, K, X', Y'))``: the InfoNCE of the
    embeddings with labels and predictions resized to the features' size by nearest neighbour (label -1 is
    ignored), then the embeddings are pushed into the queues. Returns a scalar.
    """

    def __init__(self, in_channels: int, num_classes: int, embedding_dim: int, queue_size: int, temperature: float,
                 max_anchors_per_class: int, queue_pixels_per_image: int):
        super().__init__()
        self.head = ProjectionHead(in_channels, embedding_dim, spatial_dims=2)
        self.queue = ClassMemoryQueue(num_classes, embedding_dim, queue_size)
        self.loss = CrossImagePixelContrastLoss(temperature=temperature, max_anchors_per_class=max_anchors_per_class,
                                                queue_pixels_per_image=queue_pixels_per_image)

    def forward(self, features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        embeddings = self.head(features.float())
        size = embeddings.shape[2:]
        labels = resize_labels_nearest(labels, size)
        predictions = resize_labels_nearest(logits.detach().argmax(1), size)
        value = self.loss(embeddings, labels, queue=self.queue, predictions=predictions)
        self.loss.update_queue(self.queue, embeddings, labels)
        return value

    def checkpoint_state(self) -> dict:
        """Head and queues for the trainer's checkpoint (CPU tensors)."""
        return {"projection_head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
                "queue": {k: v.detach().cpu() for k, v in self.queue.state_dict().items()}}

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore what :meth:`checkpoint_state` returned (a :class:`CIMISError` if the checkpoint has none)."""
        if "projection_head" not in state:
            raise CIMISError("This checkpoint has no DDCL projection head: it was written with contrast_weight = 0 "
                             "or by another trainer; resume with the same hyperparameters.")
        self.head.load_state_dict(state["projection_head"])
        self.queue.load_state_dict(state["queue"])
