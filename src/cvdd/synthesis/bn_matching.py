"""BatchNorm statistic matching: the regulariser that ties synthetic images to an expert's training data.

For every ``BatchNorm2d`` layer l of an expert (in ``model.modules()`` order), the per-channel mean and
*biased* variance of the layer's **input** over (batch, H, W) are compared with the layer's running
statistics (method doc §3.4):

    BN = Σ_l c_l · ( ‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂ ),   c_l = first_multiplier for the first BN, else 1

where ‖·‖₂ is the non-squared Euclidean norm over channels and the first BN is the one
:func:`cvdd.models.first_bn` returns (the stem BN; DenseNet's first bottleneck BN).

The statistics are captured by forward hooks that exist only inside a context manager, so an expert is never
left with hooks attached, not even when the block raises.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from cvdd.errors import ModelError
from cvdd.models import first_bn

__all__ = ["BNMatching", "BNStatHook", "channel_moments"]


class _ChannelMoments(torch.autograd.Function):
    """Per-channel mean and biased variance over (N/G, H, W) of each of G batch groups, in at least fp32.

    Autograd through ``x.float()`` + ``var_mean`` would keep an fp32 copy of every BN input of a bf16 forward
    until the backward pass (as much memory as the bf16 activations save). Here the backward is written out,
    d mean/dx = 1/M and d var/dx = 2 (x - mean) / M with M = (N/G)·H·W, and only ``x`` (which the BN layer keeps
    anyway) and the per-group, per-channel mean are saved.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        # Splitting the batch dimension is a view for any memory format (channels_last included).
        var, mean = torch.var_mean(xf.view(groups, -1, *x.shape[1:]), dim=(1, 3, 4), correction=0)
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx: Any, g_mean: torch.Tensor, g_var: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        x, mean = ctx.saved_tensors
        groups = mean.shape[0]
        m = x.numel() // (x.shape[1] * groups)
        view = (groups, 1, -1, 1, 1)
        xf = x.to(mean.dtype).view(groups, -1, *x.shape[1:])
        grad = g_mean.view(view) / m + (2.0 / m) * g_var.view(view) * (xf - mean.view(view))
        return grad.view(x.shape).to(x.dtype), None


def channel_moments(x: torch.Tensor, groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel of x (N, C, H, W), in fp32 (fp64 for fp64 inputs).

    Args:
        x: the batch (N, C, H, W).
        groups: None: one statistic over the whole batch, each (C,). G: the batch is G consecutive groups of
            N/G images ("ghost batches") and each gets its own statistics, each (G, C).
    """
    if groups is None:
        mean, var = _ChannelMoments.apply(x, 1)
        return mean[0], var[0]
    if groups < 1 or x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} images does not split into {groups} equal groups")
    return _ChannelMoments.apply(x, groups)


class BNMatching:
    """Context manager recording the input statistics of every BN layer of ``model``; turns them into the loss.

    Example::

        with BNMatching(expert, first_multiplier=10.0) as bn:
            logits = expert(x)                      # x: (B, 3, H, W), requires grad
            loss = ce(logits, y) + r_bn * bn.loss()
            loss.backward()                         # reaches x through the BN statistics too

    Only the most recent forward pass of ``model`` counts: a pre-hook on ``model`` itself forgets the
    statistics of the previous call, so a layer that did not run in the latest call is reported instead of
    silently contributing stale numbers. A BN module that runs several times in one forward (weight
    sharing) contributes the statistics of its last call.

    The hooks do not touch the model: in eval mode (which recover uses) the running statistics are read,
    never updated, and the model's parameters need no gradient for the loss to reach the input.

    Args:
        model: the expert, normally in eval mode with frozen parameters.
        first_multiplier: weight c of the first BN layer (``first_bn(model)``); every other layer has weight 1.

    Attributes:
        layers: the ``BatchNorm2d`` modules, in ``model.modules()`` order.
        names: their qualified names in ``model`` (``""`` for a model that is itself a BN), for logging.
        multipliers: c_l per layer, aligned with ``layers``.

    Raises:
        ModelError: a BN layer keeps no running statistics (``track_running_stats=False``), so there is
            nothing to match.
    """

    def __init__(self, model: nn.Module, first_multiplier: float = 10.0) -> None:
        self.model = model
        named = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        self.names = [name for name, _ in named]
        self.layers: list[nn.BatchNorm2d] = [m for _, m in named]
        for name, layer in named:
            if layer.running_mean is None or layer.running_var is None:
                raise ModelError(f"BatchNorm layer '{name}' keeps no running statistics; BN matching needs them")
        first = first_bn(model)
        self.multipliers = [float(first_multiplier) if m is first else 1.0 for m in self.layers]
        # (mean, var) of each layer's input in the latest forward, or None when the layer has not run yet.
        self._stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self._handles: list[RemovableHandle] = []
        self._group_weights: torch.Tensor | None = None

    def set_groups(self, weights: torch.Tensor | None) -> None:
        """Match the statistics of G consecutive equal groups of the next forwards' batches separately.

        The loss then becomes Σ_g w_g Σ_l c_l BN_l(group g): what G separate forwards of the groups would give,
        in one forward. Recover uses it to optimise several IPC indices in one batch while each index keeps its
        own BN statistics, as in the paper where each index is its own batch (an expert in eval mode treats every
        image independently, so only the statistics couple the images).

        Args:
            weights: (G,) weight per group, or None for one statistic over the whole batch (weight 1).
        """
        self._group_weights = None if weights is None else weights.detach().flatten()

    def _make_hook(self, i: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        """Forward hook of layer ``i``: store the fp32 mean and biased variance of its input, with graph."""

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            # Autocast off and at least fp32: bf16/fp16 moments of 100-image batches lose too many digits for a
            # loss that compares them with fp32 running statistics. fp64 inputs stay fp64 (gradient checks).
            groups = None if self._group_weights is None else len(self._group_weights)
            with torch.autocast(device_type=x.device.type, enabled=False):
                mean, var = channel_moments(x, groups)
            self._stats[i] = (mean, var)

        return hook

    def _forget(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """Pre-hook on the root model: a new forward starts, the previous statistics no longer count."""
        self._stats = [None] * len(self.layers)

    def __enter__(self) -> BNMatching:
        if self._handles:
            raise RuntimeError("BNMatching context entered twice; use one instance per `with` block")
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._forget))
            for i, layer in enumerate(self.layers):
                self._handles.append(layer.register_forward_hook(self._make_hook(i)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        """Remove every hook and drop the stored statistics (they hold the autograd graph of the last batch)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stats = [None] * len(self.layers)

    def per_layer(self) -> list[torch.Tensor]:
        """Unweighted terms ‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂ of the latest forward, one scalar per BN layer.

        With groups (:meth:`set_groups`), each layer's term is the group-weighted sum Σ_g w_g (‖μ_lg − μ̂_l‖₂ +
        ‖σ²_lg − σ̂²_l‖₂).

        Returns:
            A list aligned with :attr:`layers`, each a 0-d tensor (fp32, or fp64 for an fp64 input) with gradient
            to the input of the forward.

        Raises:
            RuntimeError: no forward ran inside the context, or some BN layer did not run in the latest one.
        """
        out = []
        for name, layer, stats in zip(self.names, self.layers, self._stats):
            if stats is None:
                raise RuntimeError(
                    f"BN layer '{name}' has no statistics: run a forward of the model inside the BNMatching context"
                )
            mean, var = stats
            ref_mean = layer.running_mean.to(device=mean.device, dtype=mean.dtype)
            ref_var = layer.running_var.to(device=var.device, dtype=var.dtype)
            term = torch.linalg.vector_norm(mean - ref_mean, dim=-1) + torch.linalg.vector_norm(var - ref_var, dim=-1)
            if term.dim():
                if self._group_weights is None or len(self._group_weights) != len(term):
                    raise RuntimeError("BN groups changed between the forward and the loss; call set_groups first")
                term = (term * self._group_weights.to(device=term.device, dtype=term.dtype)).sum()
            out.append(term)
        return out

    def loss(self) -> torch.Tensor:
        """Σ_l c_l · BN_l over every BN layer of the latest forward.

        Returns:
            A 0-d fp32 (fp64 for fp64 inputs) tensor with gradient to the input of the latest forward; 0 for a
            model without BN layers.
        """
        parts = self.per_layer()
        if not parts:
            device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
            return torch.zeros((), device=device)
        weights = torch.tensor(self.multipliers, dtype=parts[0].dtype, device=parts[0].device)
        return (torch.stack(parts) * weights).sum()


#: The name the recover design notes use for the same context manager.
BNStatHook = BNMatching
