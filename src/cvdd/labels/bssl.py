"""Teachers for soft labels, with Batch-Specific Soft Labelling (BSSL).

In BSSL mode every BatchNorm of the teacher normalises with the statistics of the current (micro-)batch
instead of its running statistics. cvdd does this without touching the stored expert: inside
:func:`bssl_mode` each BN layer is put in training mode with ``track_running_stats`` off, so it uses batch
statistics and *does not* update its running buffers (the official code left teachers in train mode, which
drifted the running statistics and switched dropout on); every other module stays in eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from cvdd.device import autocast
from cvdd.errors import ConfigError
from cvdd.experts import Expert, pool_priors


@contextlib.contextmanager
def bssl_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Make ``model``'s BatchNorm layers use batch statistics without updating running statistics.

    Dropout and every other module keep their mode (eval for a loaded expert). The previous state of each BN
    layer is restored on exit, also after an exception.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.training, m.track_running_stats))
            m.training = True
            m.track_running_stats = False  # running buffers are then passed as None: batch stats, no update
    try:
        yield model
    finally:
        for m, training, track in saved:
            m.training = training
            m.track_running_stats = track


class Teacher:
    """One expert or a weighted committee producing soft labels (weighted sum of logits).

    Args:
        experts: the teacher models (frozen, eval mode).
        weights: one weight per expert (e.g. softmax(prior / 10)); summed logits are Σ_k w_k z_k.
        bssl: BN uses the statistics of each group of ``group_size`` images (BSSL) instead of running stats.
        group_size: BN group of the BSSL teacher; it must equal the student's micro-batch so that the labels
            are produced with the statistics of exactly the images the student normalises together. 0 or None
            means the whole batch passed in.
        precision: ``fp32`` or ``bf16`` autocast of the experts' forward (the returned logits are float32).
        channels_last: run the experts in channels_last (default, as training: a BSSL teacher forward took 0.64x
            the NCHW time on a 2-core CPU); the experts' weights are converted in place on the next call (same
            values, another memory layout). Logits agree with NCHW up to rounding (measured 2e-6), so the switch is
            not part of :meth:`describe` and stored labels made either way stay valid.
    """

    def __init__(
        self, experts: Sequence[Expert], weights: Sequence[float], bssl: bool = True, group_size: int | None = None
    ) -> None:
        if len(experts) != len(weights) or not experts:
            raise ConfigError("a teacher needs one weight per expert and at least one expert")
        self.experts = list(experts)
        self.weights = [float(w) for w in weights]
        self.bssl = bssl
        self.group_size = group_size or 0
        self.precision = "fp32"
        self.channels_last = True
        self._layout: torch.memory_format | None = None  # the experts' current layout, once set by a call

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {
            "experts": self.names,
            "weights": self.weights,
            "bssl": self.bssl,
            "group_size": self.group_size,
        }
        # The experts' weight files (sha256 from their metadata): experts squeezed again under the same names make
        # another teacher. In-memory experts without a file have none.
        files = [str(e.meta.get("sha256", ""))[:16] for e in self.experts]
        if any(files):
            out["files"] = files
        if self.precision != "fp32":  # stored labels made in fp32 keep their identity
            out["precision"] = self.precision
        return out

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, group: int | None = None) -> torch.Tensor:
        """Soft-label logits of a batch: one forward per expert, each BSSL group with its own BN statistics.

        Args:
            x: (B, 3, S, S) normalised inputs (exactly what the student sees), as consecutive BN groups.
            group: images per BN group (default ``group_size``; 0: the whole batch is one group). The groups are
                consecutive, the last one may be smaller; all run in one forward
                (:func:`cvdd.engine.ghost.grouped_batch_statistics`).

        Returns:
            (B, C) float32 weighted logits.
        """
        from cvdd.engine.ghost import grouped_batch_statistics

        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        if layout != self._layout:
            for expert in self.experts:
                expert.model.to(memory_format=layout)
            self._layout = layout
        x = x.contiguous(memory_format=layout)
        group = self.group_size if group is None else group
        total = None
        for expert, w in zip(self.experts, self.weights):
            with contextlib.ExitStack() as ctx:
                if self.bssl:  # without BSSL the BN layers use running statistics: groups do not matter
                    ctx.enter_context(bssl_mode(expert.model))
                    if 0 < group < len(x):
                        ctx.enter_context(grouped_batch_statistics(expert.model, group))
                ctx.enter_context(autocast(x.device, self.precision))
                z = expert.model(x).float() * w
            total = z if total is None else total + z
        assert total is not None
        return total


def build_teacher(pool: Sequence[Expert], cfg: Any, equal: bool = False) -> Teacher:
    """The teacher an evaluation recipe names: the prior-weighted committee or one expert of ``pool``.

    Args:
        pool: the loaded experts.
        cfg: an evaluation recipe (``EvalConfig``): ``teacher`` ("committee" or an expert's name),
            ``teacher_temperature`` (softmax(prior / T) weights) and ``bssl``.
        equal: a committee teacher weighs its experts equally instead (``cvdd prior``, which measures the priors).

    Raises:
        ConfigError: ``cfg.teacher`` names no expert of the pool.
    """
    if cfg.teacher == "committee":
        mode = "equal" if equal else "prior"
        return Teacher(pool, teacher_weights(pool, mode, cfg.teacher_temperature), bssl=cfg.bssl)
    chosen = [e for e in pool if e.name == cfg.teacher]
    if not chosen:
        raise ConfigError(f"teacher {cfg.teacher!r} is not among the experts ({', '.join(e.name for e in pool)})")
    return Teacher(chosen, [1.0], bssl=cfg.bssl)


def teacher_weights(experts: Sequence[Expert], mode: str = "prior", temperature: float = 10.0) -> list[float]:
    """Relabel committee weights: softmax(prior / T) (T = 10 in the method) or equal."""
    from cvdd.synthesis.voting import voter_weights

    priors, _ = pool_priors(list(experts))
    return [
        float(w)
        for w in voter_weights(
            [priors[e.name] for e in experts], mode, temperature, generator=torch.Generator().manual_seed(0)
        )
    ]
