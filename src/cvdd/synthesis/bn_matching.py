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


def _plain_moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel in at least fp32: (C,) each for ``groups`` 0, else (G, C) each."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if groups == 0:  # one statistic over the whole batch
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
    else:  # splitting the batch dimension is a view for NCHW and channels_last alike (no copy)
        var, mean = torch.var_mean(xf.reshape(groups, -1, *x.shape[1:]), dim=(1, 3, 4), correction=0)
    return mean, var


class _ChannelMoments(torch.autograd.Function):
    """Per-channel mean and biased variance over (N/G, H, W) of each of G batch groups, in at least fp32.

    Autograd through ``x.float()`` + ``var_mean`` would keep an fp32 copy of every BN input of a bf16 forward
    until the backward pass (as much memory as the bf16 activations save). Here the backward is written out,
    d mean/dx = 1/M and d var/dx = 2 (x - mean) / M with M = (N/G)·H·W, and only ``x`` (which the BN layer keeps
    anyway) and the per-group, per-channel mean are saved. It is also fewer operations than autograd's (one
    activation-sized multiply-add), which matters where recover is bound by kernel launches (GPU, small images).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        mean, var = _plain_moments(x, groups)
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx: Any, g_mean: torch.Tensor, g_var: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        x, mean = ctx.saved_tensors
        xf = x.to(mean.dtype)
        if mean.dim() == 1:
            m = x.numel() // x.shape[1]
            view: tuple[int, ...] = (1, -1, 1, 1)
        else:
            groups = mean.shape[0]
            m = x.numel() // (x.shape[1] * groups)
            view = (groups, 1, -1, 1, 1)
            xf = xf.reshape(groups, -1, *x.shape[1:])
        # grad = g_mean/m + (2/m) g_var (x - mean), written as x * scale + shift so that only one operation
        # runs over the whole activation (the rest is per channel): fewer kernels on a GPU, less memory traffic.
        scale = g_var * (2.0 / m)
        shift = torch.addcmul(g_mean / m, scale, mean, value=-1.0)
        grad = torch.addcmul(shift.view(view), xf, scale.view(view))
        return grad.reshape(x.shape).to(x.dtype), None


def channel_moments(x: torch.Tensor, groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel of x (N, C, H, W), in fp32 (fp64 for fp64 inputs).

    Args:
        x: the batch (N, C, H, W).
        groups: None: one statistic over the whole batch, each (C,). G: the batch is G consecutive groups of
            N/G images ("ghost batches") and each gets its own statistics, each (G, C).
    """
    if groups is not None and (groups < 1 or x.shape[0] % groups):
        raise ValueError(f"a batch of {x.shape[0]} images does not split into {groups} equal groups")
    if torch.compiler.is_compiling():
        # Traced by torch.compile: the plain expression, differentiated by AOTAutograd and fused by inductor, which
        # keeps no fp32 copy either (it recomputes the cast in the backward). The custom Function is for eager
        # runs: with it in the graph PyTorch's autograd cache is bypassed, and every later run traced each expert
        # again (about 15 s of a warm start on a 2-core CPU; docs/benchmarks/switches-cpu.md).
        return _plain_moments(x, 0 if groups is None else groups)
    return _ChannelMoments.apply(x, 0 if groups is None else groups)


class BNMatching:
    """Context manager recording the input statistics of every BN layer of ``model``; turns them into the loss.

    Example::

        with BNMatching(expert, first_multiplier=10.0) as bn:
            logits = expert(x)                      # x: (B, 3, H, W), requires grad
            loss = ce(logits, y) + r_bn * bn.loss()
            loss.backward()                         # reaches x through the BN statistics too

    Only the most recent forward pass of ``model`` counts: a pre-hook on ``model`` itself forgets the
    statistics of the previous call, so a layer that did not run in the latest call is reported instead of
    silently contributing stale numbers. A BN module that runs several times in one forward contributes the
    statistics of its first call: the later ones are the recomputation of an activation-checkpointed block during
    the backward pass (:func:`cvdd.models.checkpointed`), whose statistics must not be kept (they would hold that
    block's activations alive, the memory checkpointing is meant to free), or weight sharing, which no model of
    the zoo uses.

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
        self._layout_cache: tuple[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] | None = None
        self._widest = max((m.num_features for m in self.layers), default=0)
        self._multipliers_t: torch.Tensor | None = None

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
            # Computed on every call, so that a checkpointed block's recomputation saves the same tensors as its
            # first run did (torch.utils.checkpoint checks that); kept only from the first call of the forward.
            with torch.autocast(device_type=x.device.type, enabled=False):
                mean, var = channel_moments(x, groups)
            if self._stats[i] is None:
                self._stats[i] = (mean, var)

        return hook

    def _forget(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """Pre-hook on the root model: a new forward starts, the previous statistics no longer count."""
        self._stats = [None] * len(self.layers)

    def __enter__(self) -> BNMatching:
        if self._handles:
            raise RuntimeError("BNMatching context entered twice; use one instance per `with` block")
        self._layout_cache = None  # the running statistics may have changed since an earlier context
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
        terms = self.layer_terms()
        if terms is None:
            return []
        if terms.dim() == 1:
            if self._group_weights is not None:
                raise RuntimeError("BN groups changed between the forward and the loss; call set_groups first")
            return list(terms.unbind(-1))
        return list((terms * self._weights_like(terms)).sum(0).unbind())

    def _weights_like(self, terms: torch.Tensor) -> torch.Tensor:
        """The group weights as a (G, 1) column matching ``terms`` (G, L)."""
        if self._group_weights is None or len(self._group_weights) != terms.shape[0]:
            raise RuntimeError("BN groups changed between the forward and the loss; call set_groups first")
        return self._group_weights.to(device=terms.device, dtype=terms.dtype)[:, None]

    def _layout(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference statistics of all layers concatenated (ΣC,), and where each channel goes in an (L, C_max) grid.

        Cached per context while every layer is in eval mode (its running statistics do not change then).
        """
        # A BN layer in train mode updates its running statistics at every forward (in place, without bumping the
        # tensors' version counters), so they are re-read then; recover's experts are in eval mode: read once.
        key = (device, dtype)
        training = any(m.training for m in self.layers)
        if training or self._layout_cache is None or self._layout_cache[0] != key:
            ref_mean = torch.cat([m.running_mean for m in self.layers]).to(device=device, dtype=dtype)
            ref_var = torch.cat([m.running_var for m in self.layers]).to(device=device, dtype=dtype)
            widest = self._widest
            pos = torch.cat([torch.arange(m.num_features) + i * widest for i, m in enumerate(self.layers)])
            layout = (ref_mean, ref_var, pos.to(device))
            self._layout_cache = None if training else (key, layout)
            return layout
        ref_mean, ref_var, pos = self._layout_cache[1]
        return ref_mean, ref_var, pos

    def layer_terms(self) -> torch.Tensor | None:
        """‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂ of every layer at once: (L,), or (G, L) with groups; None without BN.

        All layers are handled by a fixed handful of operations (concatenate, subtract, scatter into a zero-padded
        (L, C_max) grid, one norm per row) instead of a few per layer: on a GPU, where a recover iteration of 32 px
        images is bound by how many kernels it launches, DenseNet-121's 120 BN layers otherwise cost more
        operations than the network itself (``bench/bench_ops.py``).
        """
        if not self.layers:
            return None
        for name, stats in zip(self.names, self._stats):
            if stats is None:
                raise RuntimeError(
                    f"BN layer '{name}' has no statistics: run a forward of the model inside the BNMatching context"
                )
        means = torch.cat([st[0] for st in self._stats], dim=-1)  # type: ignore[index]
        variances = torch.cat([st[1] for st in self._stats], dim=-1)  # type: ignore[index]
        ref_mean, ref_var, pos = self._layout(means.device, means.dtype)
        n_layers, widest = len(self.layers), self._widest
        lead = means.shape[:-1]
        diff = torch.stack([means - ref_mean, variances - ref_var])  # (2, [G,] ΣC)
        grid = diff.new_zeros(*diff.shape[:-1], n_layers * widest).index_copy(-1, pos, diff)
        norms = torch.linalg.vector_norm(grid.view(2, *lead, n_layers, widest), dim=-1)  # (2, [G,] L)
        return norms.sum(0)

    def loss(self) -> torch.Tensor:
        """Σ_l c_l · BN_l over every BN layer of the latest forward (with groups: Σ_g w_g Σ_l c_l · BN_lg).

        Returns:
            A 0-d fp32 (fp64 for fp64 inputs) tensor with gradient to the input of the latest forward; 0 for a
            model without BN layers.
        """
        terms = self.layer_terms()
        if terms is None:
            device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
            return torch.zeros((), device=device)
        if self._multipliers_t is None or self._multipliers_t.device != terms.device:
            self._multipliers_t = torch.tensor(self.multipliers, device=terms.device)
        weighted = terms * self._multipliers_t.to(terms.dtype)
        if terms.dim() == 2:
            weighted = weighted * self._weights_like(terms)
        elif self._group_weights is not None:
            raise RuntimeError("BN groups changed between the forward and the loss; call set_groups first")
        return weighted.sum()


#: The name the recover design notes use for the same context manager.
BNStatHook = BNMatching
