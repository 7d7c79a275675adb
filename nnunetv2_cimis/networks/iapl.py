"""IAPL: instance-adaptive prototype learning on nnU-Net's planned U-Net.

Paper: G. Liang, Q. Zhou et al., "Self-supervised Instance-adaptive Prototype Learning for medical image
segmentation" (IJCAI 2024; extended as arXiv 2507.07602, "Advancing Medical Image Segmentation via
Self-supervised Instance-adaptive Prototype Learning"). Facts below are from the paper and its official code
(``banbooliang/SIPL-MIS``); the code here is written for nnU-Net and differs where marked *choice*.

What the network adds on top of nnU-Net's encoder/decoder (which are built unchanged from the plans):

1. **Common prototypes**: ``num_queries`` (32) learnable queries shared by all images.
2. **Hierarchical transformer decoder**: ``layers_per_scale`` (2) k-means cross-attention layers
   (kMaX-DeepLab) per decoder scale over ``num_transformer_scales`` (3) decoder scales, coarse to fine.
   Every layer predicts pixel-to-query mask logits from L2-normalised pixel embeddings and class logits per
   query; the class-wise prediction is ``P(k | x) = sum_l softmax_l(mask)_l(x) * softmax_k(class)_lk``
   (*choice*: kMaX-DeepLab's probability form; the official code multiplies raw logits). Then each query is
   replaced by itself plus a projection of the **mean** pixel value of the voxels assigned to it
   (assignment = argmax over queries of the mask logits), then query self-attention and an FFN.
3. **Self-supervised foreground filtering**: from the second layer on, the voxels of a cluster whose
   *purity* is below a threshold do not update its query. Purity of cluster ``l`` = the largest share of one
   foreground class among the voxels assigned to ``l``, where the class of a voxel is the argmax of the
   previous layer's own prediction (no ground truth). The threshold ramps linearly from
   ``purity_threshold_start`` to ``purity_threshold_end`` with training progress
   (:meth:`IAPLNetwork.set_training_progress`, set by the trainer every epoch; a freshly built network,
   as used for inference, is at progress 1, i.e. the end threshold).
4. **Instance-specific prototypes**: one per class per image, the confidence-weighted average of the
   bottleneck features, weights = the final transformer prediction's class probabilities (resized to the
   bottleneck) normalised to sum 1 over the voxels.
5. **Dynamic per-class heads**: the instance prototype (projected) and a learnable class embedding generate
   the weights of a small 3-layer 1x1 convolution head (``head_channels`` = 8) per class and image, applied
   to the full-resolution decoder features: the output is one logit map per class, ``(B, K, X, Y[, Z])``.

Outputs: with ``decoder.deep_supervision`` True (nnU-Net's training mode) a list
``[logits, aux_0, aux_1, ...]``: the full-resolution logits first, then the log-probabilities of every
intermediate transformer prediction, finest (the final predictor) first. With it False (inference,
``nnUNetv2_predict``) just the logits ``(B, K, ...)``. nnU-Net's ``set_deep_supervision_enabled`` keeps
working because the network keeps nnU-Net's ``decoder`` module and reads its ``deep_supervision`` flag. The
decoder's own 1x1 ``seg_layers`` are removed (unused here).

Works for 2D and 3D: spatial operations use the plans' ``conv_op`` / ``norm_op``; the rest acts on
flattened voxels.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------------
# Pure functions (unit-tested with hand-computed values)
# ---------------------------------------------------------------------------------------------------------


def cluster_purity(assignment: torch.Tensor, predicted_class: torch.Tensor, num_queries: int,
                   num_classes: int) -> torch.Tensor:
    """Purity of every cluster: the largest share of one foreground class among its voxels.

    Args:
        assignment: ``(B, N)`` long, the query (cluster) index of every voxel, in ``[0, num_queries)``.
        predicted_class: ``(B, N)`` long, the predicted class of every voxel (argmax of the previous layer's
            prediction), in ``[0, num_classes)``; class 0 is background and never counts as pure.
        num_queries: number of clusters ``L``.
        num_classes: number of classes ``K`` (background included), ``>= 2``.

    Returns:
        ``(B, L)`` float purity in ``[0, 1]``; an empty cluster has purity 0.

    Raises:
        ValueError: on mismatching shapes or ``num_classes < 2``.
    """
    if assignment.ndim != 2 or predicted_class.shape != assignment.shape:
        raise ValueError(f"assignment {tuple(assignment.shape)} and predicted_class "
                         f"{tuple(predicted_class.shape)} must both be (B, N)")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + one class), got {num_classes}")
    b, n = assignment.shape
    joint = torch.zeros(b, num_queries * num_classes, device=assignment.device, dtype=torch.float32)
    joint.scatter_add_(1, assignment.long() * num_classes + predicted_class.long(),
                       torch.ones(b, n, device=assignment.device, dtype=torch.float32))
    joint = joint.view(b, num_queries, num_classes)
    size = joint.sum(-1)
    best_foreground = joint[:, :, 1:].max(-1).values
    return best_foreground / size.clamp_min(1.0)


def kmeans_update(values: torch.Tensor, assignment: torch.Tensor, num_queries: int,
                  keep: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """k-means step of kMaX-DeepLab's cross-attention: the mean value of the voxels assigned to each query.

    Args:
        values: ``(B, D, N)`` pixel values (gradients flow through them).
        assignment: ``(B, N)`` long cluster index per voxel (hard argmax, no gradient).
        num_queries: ``L``.
        keep: optional ``(B, L)`` bool; clusters with False contribute nothing (foreground filtering).

    Returns:
        ``(update, counts)``: ``(B, L, D)`` means (zero for empty or filtered clusters) and ``(B, L)`` voxel
        counts that entered them.
    """
    if values.ndim != 3 or assignment.ndim != 2 or values.shape[0] != assignment.shape[0] \
            or values.shape[2] != assignment.shape[1]:
        raise ValueError(f"values must be (B, D, N) and assignment (B, N) with the same B and N, got "
                         f"{tuple(values.shape)} and {tuple(assignment.shape)}")
    if keep is not None and keep.shape != (values.shape[0], num_queries):
        raise ValueError(f"keep must be (B, L) = ({values.shape[0]}, {num_queries}), got {tuple(keep.shape)}")
    # float32 without autocast: counts and sums over many voxels overflow float16
    with torch.autocast(device_type=values.device.type, enabled=False):
        one_hot = F.one_hot(assignment.long(), num_queries).float()  # B, N, L
        if keep is not None:
            one_hot = one_hot * keep[:, None, :].float()
        counts = one_hot.sum(1)  # B, L
        sums = torch.einsum("bnl,bdn->bld", one_hot, values.float())
        return sums / counts.clamp_min(1.0)[..., None], counts


def confidence_weights(probabilities: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-class pooling weights: the class probabilities normalised to sum 1 over the voxels.

    Args:
        probabilities: ``(B, K, X, Y[, Z])`` non-negative class probabilities.
        eps: floor of the per-class sum (a class with zero probability everywhere gets all-zero weights).

    Returns:
        ``(B, K, N)`` weights, ``N`` = number of voxels; each row sums to 1 (or 0 for an absent class).
    """
    if probabilities.ndim not in (4, 5):
        raise ValueError(f"probabilities must be (B, K, X, Y) or (B, K, X, Y, Z), got {tuple(probabilities.shape)}")
    p = probabilities.flatten(2)
    return p / p.sum(-1, keepdim=True).clamp_min(eps)


def confidence_weighted_pooling(features: torch.Tensor, probabilities: torch.Tensor,
                                eps: float = 1e-6) -> torch.Tensor:
    """Instance-specific prototypes: ``proto[b, k] = sum_x w_k(x) f_b(x)`` with :func:`confidence_weights`.

    Args:
        features: ``(B, C, X, Y[, Z])``.
        probabilities: ``(B, K, X, Y[, Z])`` with the same batch and spatial sizes (resize it first).

    Returns:
        ``(B, K, C)`` one prototype per class per image.

    Raises:
        ValueError: if the batch or spatial sizes differ.
    """
    if features.ndim != probabilities.ndim or features.shape[0] != probabilities.shape[0] \
            or features.shape[2:] != probabilities.shape[2:]:
        raise ValueError(f"features {tuple(features.shape)} and probabilities {tuple(probabilities.shape)} "
                         f"must have the same batch and spatial sizes; resize the probabilities first")
    with torch.autocast(device_type=features.device.type, enabled=False):  # weights ~1/N: keep float32
        w = confidence_weights(probabilities.float(), eps)
        return torch.einsum("bkn,bcn->bkc", w, features.flatten(2).float())


def purity_threshold(progress: float, start: float, end: float, ramp_fraction: float) -> float:
    """Threshold of the foreground filter: linear from ``start`` to ``end`` over the first ``ramp_fraction``
    of training (``progress`` in [0, 1]), then constant."""
    if ramp_fraction <= 0:
        return end
    t = min(max(progress / ramp_fraction, 0.0), 1.0)
    return start + (end - start) * t


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------


def _conv1x1(conv_op, cin, cout, bias=True):
    return conv_op(cin, cout, kernel_size=1, stride=1, padding=0, bias=bias)


class QueryPredictor(nn.Module):
    """Mask and class prediction from queries and pixel features (kMaX-DeepLab's predictor).

    Args:
        pixel_channels: channels of the pixel features fed in.
        query_dim: query width ``Q``.
        embed_dim: width ``E`` of the L2-normalised pixel embeddings and mask kernels.
        num_classes: ``K`` (background included).
        conv_op, norm_op, norm_op_kwargs: from the plans (2D or 3D).

    Forward: ``pixels (B, C, X, Y[, Z])``, ``queries (B, L, Q)`` -> dict with ``mask_logits (B, L, N)``,
    ``class_logits (B, L, K)``, ``probs (B, K, X, Y[, Z])`` (class-wise prediction, sums to 1 over K).
    """

    def __init__(self, pixel_channels: int, query_dim: int, embed_dim: int, num_classes: int, conv_op,
                 norm_op, norm_op_kwargs: Optional[dict]):
        super().__init__()
        kwargs = dict(norm_op_kwargs or {})
        # choice: 1x1 convolutions where kMaX-DeepLab has a 5x5 depthwise one (3D depthwise convolutions are
        # slow, above all on CPU); the decoder's 3x3 convolutions already give spatial context
        self.pixel_head = nn.Sequential(
            _conv1x1(conv_op, pixel_channels, pixel_channels, bias=False),
            norm_op(pixel_channels, **kwargs), nn.GELU(),
            _conv1x1(conv_op, pixel_channels, embed_dim),
        )
        self.query_norm = nn.LayerNorm(query_dim)
        self.mask_head = nn.Linear(query_dim, embed_dim)
        self.class_head = nn.Linear(query_dim, num_classes)
        # learnable temperature of the cosine-like mask logits (pixels are unit vectors)
        self.mask_logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, pixels: torch.Tensor, queries: torch.Tensor) -> Dict[str, torch.Tensor]:
        emb = F.normalize(self.pixel_head(pixels), p=2, dim=1)
        q = self.query_norm(queries)
        kernels = F.normalize(self.mask_head(q), p=2, dim=-1)
        mask_logits = torch.einsum("ben,ble->bln", emb.flatten(2), kernels) * self.mask_logit_scale.exp()
        class_logits = self.class_head(q)
        probs = torch.einsum("bln,blk->bkn", mask_logits.softmax(1), class_logits.softmax(-1))
        return {"mask_logits": mask_logits, "class_logits": class_logits,
                "probs": probs.reshape(*probs.shape[:2], *pixels.shape[2:])}


class KMeansTransformerLayer(nn.Module):
    """One layer of the hierarchical transformer decoder: prediction, k-means cross-attention with
    foreground filtering, query self-attention, FFN (pre-norm residuals; *choice*: LayerNorm on queries and
    the plans' normalisation on pixels instead of kMaX's BatchNorms).

    Forward: ``pixels (B, C, ...)``, ``queries (B, L, Q)``, ``previous_probs`` (the previous layer's
    ``(B, K, ...)`` prediction at any resolution, or None: no filtering), ``threshold`` (float) ->
    ``(new queries (B, L, Q), prediction dict of the incoming queries)``; the dict also holds ``keep``
    ``(B, L)`` (None when not filtered).
    """

    def __init__(self, pixel_channels: int, query_dim: int, embed_dim: int, num_classes: int, num_heads: int,
                 ffn_expansion: int, conv_op, norm_op, norm_op_kwargs: Optional[dict]):
        super().__init__()
        kwargs = dict(norm_op_kwargs or {})
        self.num_classes = num_classes
        self.pixel_proj = nn.Sequential(_conv1x1(conv_op, pixel_channels, embed_dim, bias=False),
                                        norm_op(embed_dim, **kwargs), nn.GELU())
        self.pixel_value = _conv1x1(conv_op, embed_dim, embed_dim)
        self.predictor = QueryPredictor(embed_dim, query_dim, embed_dim, num_classes, conv_op, norm_op,
                                        norm_op_kwargs)
        self.update_norm = nn.LayerNorm(embed_dim)
        self.update_proj = nn.Linear(embed_dim, query_dim)
        self.attn_norm = nn.LayerNorm(query_dim)
        self.self_attention = nn.MultiheadAttention(query_dim, num_heads, batch_first=True)
        self.ffn_norm = nn.LayerNorm(query_dim)
        self.ffn = nn.Sequential(nn.Linear(query_dim, ffn_expansion * query_dim), nn.GELU(),
                                 nn.Linear(ffn_expansion * query_dim, query_dim))

    def forward(self, pixels: torch.Tensor, queries: torch.Tensor, previous_probs: Optional[torch.Tensor],
                threshold: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        num_queries = queries.shape[1]
        space = self.pixel_proj(pixels)
        pred = self.predictor(space, queries)
        with torch.no_grad():
            assignment = pred["mask_logits"].argmax(1)  # B, N
            keep = None
            if previous_probs is not None:
                prev = previous_probs.detach()
                if prev.shape[2:] != pixels.shape[2:]:
                    mode = "bilinear" if prev.ndim == 4 else "trilinear"
                    prev = F.interpolate(prev.float(), size=pixels.shape[2:], mode=mode, align_corners=False)
                purity = cluster_purity(assignment, prev.argmax(1).flatten(1), num_queries, self.num_classes)
                keep = purity >= threshold
        values = self.pixel_value(space).flatten(2)
        update, _ = kmeans_update(values, assignment, num_queries, keep)
        queries = queries + self.update_proj(self.update_norm(update.to(queries.dtype)))
        q = self.attn_norm(queries)
        queries = queries + self.self_attention(q, q, q, need_weights=False)[0]
        queries = queries + self.ffn(self.ffn_norm(queries))
        pred["keep"] = keep
        return queries, pred


class DynamicClassHeads(nn.Module):
    """Per-class, per-image 1x1 convolution heads whose weights are generated from the instance-specific
    prototype and a learnable class embedding (three layers ``h -> h -> h -> 1``, ReLU between, as the
    official code with ``h = head_channels = 8``).

    Args:
        feature_channels: channels of the full-resolution decoder features.
        prototype_channels: channels of the instance prototypes (bottleneck width).
        num_classes: ``K``.
        head_channels: ``h``.
        embedding_dim: width of the projected prototype and of the class embedding.

    Forward: ``features (B, F, X, Y[, Z])``, ``prototypes (B, K, P)`` -> logits ``(B, K, X, Y[, Z])``.
    """

    def __init__(self, feature_channels: int, prototype_channels: int, num_classes: int, head_channels: int,
                 embedding_dim: int, conv_op, norm_op, norm_op_kwargs: Optional[dict]):
        super().__init__()
        h = head_channels
        self.num_classes = num_classes
        self.head_channels = h
        self.precls = nn.Sequential(norm_op(feature_channels, **dict(norm_op_kwargs or {})), nn.ReLU(),
                                    _conv1x1(conv_op, feature_channels, h))
        self.prototype_proj = nn.Sequential(nn.LayerNorm(prototype_channels),
                                            nn.Linear(prototype_channels, embedding_dim), nn.ReLU())
        self.class_embedding = nn.Parameter(torch.randn(num_classes, embedding_dim))
        self.split = [h * h, h, h * h, h, h, 1]
        self.controller = nn.Linear(2 * embedding_dim, sum(self.split))

    def forward(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        b, k = prototypes.shape[:2]
        h = self.head_channels
        cond = torch.cat([self.prototype_proj(prototypes),
                          self.class_embedding[None].expand(b, -1, -1).to(prototypes.dtype)], -1)
        w1, b1, w2, b2, w3, b3 = torch.split(self.controller(cond), self.split, dim=-1)
        x = self.precls(features).flatten(2)  # B, h, N
        y = torch.einsum("bkoc,bcn->bkon", w1.reshape(b, k, h, h), x) + b1[..., None]
        y = F.relu(y)
        y = torch.einsum("bkoc,bkcn->bkon", w2.reshape(b, k, h, h), y) + b2[..., None]
        y = F.relu(y)
        y = torch.einsum("bkc,bkcn->bkn", w3, y) + b3
        return y.reshape(b, k, *features.shape[2:])


class IAPLNetwork(nn.Module):
    """nnU-Net's planned U-Net encoder/decoder with the IAPL prototype head (see the module docstring).

    Args:
        unet: a network built by nnU-Net's ``get_network_from_plans`` (``PlainConvUNet``,
            ``ResidualEncoderUNet``, ...): it must have ``encoder`` (returning skips) and ``decoder``
            (``stages``, ``transpconvs``, ``deep_supervision``). Its ``encoder`` and ``decoder`` are reused.
        num_classes: ``K`` outputs (background included), ``>= 2``.
        num_queries: common prototypes (32, the paper's).
        layers_per_scale: transformer layers per decoder scale (2, the paper's).
        num_transformer_scales: decoder scales used by the transformer (3, the paper's); the finest decoder stages
            below full resolution, coarse to fine; fewer if the U-Net has fewer (at least the full-resolution
            stage when it is the only one).
        embed_dim: width of pixel embeddings (128, as the official code).
        num_heads: query self-attention heads (8, kMaX-DeepLab); must divide the query width, which is the
            channel count of the coarsest transformer scale.
        ffn_expansion: query FFN width factor (4, *choice*).
        head_channels: width of the dynamic heads (8, the paper's).
        prototype_embedding_dim: width of the projected instance prototype and class embedding (128,
            *choice*; official 256).
        purity_threshold_start, purity_threshold_end, purity_ramp_fraction: filtering threshold schedule
            (0.1 -> 0.5 over the whole training, *choice* of ramp length).

    Raises:
        ValueError: on a U-Net without the expected parts or invalid hyperparameters.
    """

    def __init__(self, unet: nn.Module, num_classes: int, num_queries: int = 32, layers_per_scale: int = 2,
                 num_transformer_scales: int = 3, embed_dim: int = 128, num_heads: int = 8,
                 ffn_expansion: int = 4, head_channels: int = 8, prototype_embedding_dim: int = 128,
                 purity_threshold_start: float = 0.1, purity_threshold_end: float = 0.5,
                 purity_ramp_fraction: float = 1.0):
        super().__init__()
        for name in ("encoder", "decoder"):
            if not hasattr(unet, name):
                raise ValueError(f"IAPLNetwork needs a U-Net with an `{name}` (nnU-Net's get_network_from_plans "
                                 f"output), got {type(unet).__name__}")
        if not hasattr(unet.decoder, "stages") or not hasattr(unet.decoder, "transpconvs"):
            raise ValueError(f"the decoder of {type(unet).__name__} has no `stages`/`transpconvs`; IAPL supports "
                             f"nnU-Net's UNetDecoder")
        for name, value, low in (("num_classes", num_classes, 2), ("num_queries", num_queries, 1),
                                 ("layers_per_scale", layers_per_scale, 1),
                                 ("num_transformer_scales", num_transformer_scales, 1), ("embed_dim", embed_dim, 1),
                                 ("num_heads", num_heads, 1), ("ffn_expansion", ffn_expansion, 1),
                                 ("head_channels", head_channels, 1),
                                 ("prototype_embedding_dim", prototype_embedding_dim, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("purity_threshold_start", purity_threshold_start),
                            ("purity_threshold_end", purity_threshold_end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if purity_ramp_fraction < 0:
            raise ValueError(f"purity_ramp_fraction must be >= 0, got {purity_ramp_fraction}")

        encoder, decoder = unet.encoder, unet.decoder
        if not getattr(encoder, "return_skips", True):
            raise ValueError("the U-Net encoder must return its skips (return_skips=True)")
        self.encoder = encoder
        self.decoder = decoder
        # the per-scale 1x1 seg layers of nnU-Net are replaced by the prototype head
        self.decoder.seg_layers = nn.ModuleList()
        conv_op, norm_op, norm_kwargs = encoder.conv_op, encoder.norm_op, encoder.norm_op_kwargs
        self.spatial_dims = 2 if conv_op is nn.Conv2d else 3
        if norm_op is None:
            norm_op = nn.InstanceNorm2d if self.spatial_dims == 2 else nn.InstanceNorm3d
            norm_kwargs = {"affine": True}
        self.num_classes = int(num_classes)
        self.num_queries = int(num_queries)
        self.layers_per_scale = int(layers_per_scale)
        self.purity_threshold_start = float(purity_threshold_start)
        self.purity_threshold_end = float(purity_threshold_end)
        self.purity_ramp_fraction = float(purity_ramp_fraction)
        self.training_progress = 1.0

        stage_channels = list(encoder.output_channels)[::-1][1:]  # decoder stage s outputs this width
        n_dec = len(decoder.stages)
        below_full = list(range(n_dec - 1)) or [n_dec - 1]
        self.transformer_stages = below_full[-int(num_transformer_scales):]
        query_dim = stage_channels[self.transformer_stages[0]]
        if query_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the query width {query_dim} (channels of the "
                             f"coarsest transformer scale); choose a divisor of {query_dim}")
        self.queries = nn.Parameter(torch.randn(self.num_queries, query_dim))
        layers = []
        for s in self.transformer_stages:
            for _ in range(self.layers_per_scale):
                layers.append(KMeansTransformerLayer(stage_channels[s], query_dim, embed_dim, self.num_classes,
                                                     num_heads, ffn_expansion, conv_op, norm_op, norm_kwargs))
        self.transformer_layers = nn.ModuleList(layers)
        self.final_query_norm = nn.LayerNorm(query_dim)
        self.final_pixel_proj = nn.Sequential(
            _conv1x1(conv_op, stage_channels[self.transformer_stages[-1]], embed_dim, bias=False),
            norm_op(embed_dim, **dict(norm_kwargs or {})), nn.GELU())
        self.final_predictor = QueryPredictor(embed_dim, query_dim, embed_dim, self.num_classes, conv_op, norm_op,
                                              norm_kwargs)
        self.heads = DynamicClassHeads(stage_channels[-1], encoder.output_channels[-1], self.num_classes,
                                       int(head_channels), int(prototype_embedding_dim), conv_op, norm_op,
                                       norm_kwargs)

    # -- schedule -------------------------------------------------------------------------------------
    def set_training_progress(self, progress: float) -> float:
        """Set training progress in [0, 1] (epoch / (epochs - 1)); returns the resulting purity threshold."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        self.training_progress = float(progress)
        return self.purity_threshold

    @property
    def purity_threshold(self) -> float:
        return purity_threshold(self.training_progress, self.purity_threshold_start, self.purity_threshold_end,
                                self.purity_ramp_fraction)

    # -- forward --------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Encoder skips and decoder stage outputs (coarse to fine), as nnU-Net's decoder computes them."""
        skips = self.encoder(x)
        lres = skips[-1]
        feats = []
        for s in range(len(self.decoder.stages)):
            y = self.decoder.transpconvs[s](lres)
            y = torch.cat((y, skips[-(s + 2)]), 1)
            lres = self.decoder.stages[s](y)
            feats.append(lres)
        return skips, feats

    def forward(self, x: torch.Tensor):
        """``x (B, C_in, X, Y[, Z])`` -> logits ``(B, K, X, Y[, Z])``, or with deep supervision the list
        ``[logits, log-probs of the final transformer prediction, ..., of the first layer]``."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"IAPLNetwork was built for {self.spatial_dims}D input (B, C, "
                             f"{'X, Y' if self.spatial_dims == 2 else 'X, Y, Z'}), got shape {tuple(x.shape)}")
        skips, feats = self.forward_features(x)
        b = x.shape[0]
        queries = self.queries[None].expand(b, -1, -1).to(feats[0].dtype)
        threshold = self.purity_threshold
        previous = None
        aux: List[torch.Tensor] = []
        i = 0
        for s in self.transformer_stages:
            for _ in range(self.layers_per_scale):
                queries, pred = self.transformer_layers[i](feats[s], queries, previous, threshold)
                aux.append(pred["probs"])
                previous = pred["probs"]
                i += 1
        final = self.final_predictor(self.final_pixel_proj(feats[self.transformer_stages[-1]]),
                                     self.final_query_norm(queries))
        probs = final["probs"]
        aux.append(probs)
        bottleneck = skips[-1]
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        probs_b = probs if probs.shape[2:] == bottleneck.shape[2:] else \
            F.interpolate(probs.float(), size=bottleneck.shape[2:], mode=mode, align_corners=False)
        prototypes = confidence_weighted_pooling(bottleneck, probs_b).to(feats[-1].dtype)
        logits = self.heads(feats[-1], prototypes)
        if self.decoder.deep_supervision:
            return [logits] + [torch.log(p.float().clamp_min(1e-8)) for p in aux[::-1]]
        return logits
