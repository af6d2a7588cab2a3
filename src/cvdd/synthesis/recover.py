"""``cvdd recover``: synthesise images by committee voting (CV-DD); SRe2L++ is the single-expert case.

The work is split into units (a block of IPC indices x a block of classes). Each unit has its own seed
derived from the run seed and its position, is optimised independently, and is written atomically to
``<out>/units/``; a re-run skips finished units, so a killed recover resumes where it stopped, and the
same seed gives the same images. When every unit is done, they are assembled into one lossless tensor
file (``synthetic.safetensors`` + ``synthetic.json``) and a PNG grid.

Loss of a unit (for the paper's one IPC index per unit this is exactly Σ_e w_e (CE_e + r_bn BN_e)):

    L = Σ_k Σ_{e ∈ S_k} w_{k,e} · CE_e(images of IPC index k) + r_bn · Σ_e W_e · BN_e(images sent to e)

with S_k the committee of IPC index k, w_{k,e} its voter weights, W_e = Σ_k w_{k,e} and BN_e the BN
statistic-matching loss of expert e on the sub-batch of all the unit's images whose committee includes it.
Each image therefore receives the CE gradient it would receive alone; the BN statistics pool the unit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvdd import distributed as dd
from cvdd import tracking
from cvdd.artifacts import (
    StreamedTensorFile,
    atomic_write_text,
    base_metadata,
    build_stamp,
    check_kind,
    distinct_builds,
    fsync_file,
    load_tensors,
    other_builds,
    read_json_object,
    save_tensors,
    temp_sibling,
    verify_checksum,
)
from cvdd.config import identity_dict, to_dict
from cvdd.data.augment import Normalize, unit_float
from cvdd.data.sources import RealDataset
from cvdd.data.specs import DatasetSpec
from cvdd.device import autocast, derive_seed, make_generator, resolve_device, resolve_precision
from cvdd.errors import ArtifactError, ConfigError
from cvdd.experts import Expert, pool_priors
from cvdd.models import checkpointed
from cvdd.synthesis.bn_matching import BNMatching
from cvdd.synthesis.committee import COMMITTEE_POLICIES, select_committee
from cvdd.synthesis.init import InitCache, check_init_method, gaussian_init, patch_init, real_init
from cvdd.synthesis.jitter import clamp_to_valid, cosine_lr, recover_augment
from cvdd.synthesis.voting import VOTING_MODES, voter_weights

log = logging.getLogger(__name__)

SYNTHETIC_KIND = "synthetic"


@dataclass
class RecoverConfig:
    """Hyper-parameters of recover. Defaults are the paper's (method section 3), except the block sizes.

    Attributes:
        ipc: images per class.
        committee_size: N, voters per IPC index (1 = SRe2L++).
        committee: policy choosing each IPC index's committee: ``pairs`` (k-th of all C(M, N) combinations,
            the paper's IPC 10 setting), ``random`` (N of the pool, seeded per IPC index; the paper's IPC 50),
            ``fixed`` (the ``fixed`` list), ``single`` (one expert, ``single`` or the pool's best), or ``auto``
            (``single`` when N = 1, ``pairs`` while ipc <= C(M, N), else ``random``).
        fixed: committee for the ``fixed`` policy.
        single: expert for the ``single`` policy (default: the one with the highest prior).
        voting: voter weights: ``prior`` (softmax(prior / T)), ``equal``, ``random`` (seeded).
        temperature: T of prior voting.
        iterations: optimisation steps per unit.
        lr: Adam learning rate (cosine-decayed per iteration to 0).
        betas: Adam betas.
        r_bn: weight of the BN statistic-matching term.
        first_bn_multiplier: extra weight of each expert's first BN layer.
        anchor: weight of a term that keeps each image near its initialisation, ``anchor * mean((x - x0)²)``
            over normalised pixels (0 = off, the paper's loss). Not in the paper: later work in this field
            keeps synthetic images close to real ones.
        combine: how the experts' pixel gradients are combined each iteration: ``sum`` (the paper), ``gradnorm``
            or ``pcgrad`` (see :func:`combine_gradients`). Not in the paper: rules that may let more voters help.
        jitter: maximum roll jitter in pixels (None: the dataset's, 4 at 32/64 px, 32 at 224 px).
        crop_scale: scale range of the per-iteration random-resized crop.
        shared_crop: one crop box and flip for the whole batch per iteration (as the official code) or one
            per image.
        init: ``patches`` (RDED-style real patches scored by an observer), ``real`` or ``gaussian``.
        init_candidates: real images per class scored for ``patches``.
        init_crops: crops per candidate image.
        init_factor: patches per side (None: 1 up to 64 px, 2 above).
        init_rank_offset: first rank of the kept window of lowest-loss crops.
        observer: expert scoring the patches (None: the highest prior).
        classes_per_block: classes per unit (None: all classes, at most 100).
        ipc_per_block: IPC indices per unit (the paper uses 1; more makes bigger, faster batches).
        bn_groups: whose input statistics each expert's BN loss matches when a unit holds several IPC indices:
            ``block`` (all of the unit's images that have the expert in their committee, as one batch) or ``ipc``
            (each IPC index's images separately, weighted by its voter weight: the paper's loss, where each index
            is its own batch, computed in one larger batch; with ``ipc_per_block`` 1 both are the same).
        precision: ``fp32`` or ``bf16`` autocast for the experts' forward (pixels and BN statistics stay fp32).
        channels_last: run the experts in channels_last memory format (off unless set, also on CUDA, so that
            a run's arithmetic does not change under it). The pixels stay NCHW; only the experts' input is converted.
        compile: wrap each expert in ``torch.compile`` (the BN-matching hooks are traced with it; one graph per
            expert, its batch dimension symbolic). Pays a compilation first (about 20-30 s for the three CPU
            experts on a 2-core CPU, a few seconds once PyTorch's disk cache is warm), then ran 2.9x faster per
            iteration there (``docs/benchmarks/switches-cpu.md``): worth it from a few hundred iterations on, so
            the ``cifar10-cpu`` presets turn it on. An expert that cannot be compiled runs uncompiled.
        checkpoint: activation checkpointing of the experts' blocks (:func:`cvdd.models.checkpointed`): only the
            blocks' inputs are kept for the backward pass and each block runs twice, for large images on small
            memory (``docs/benchmarks/memory-224.md``). Same gradients, so not part of the run's identity (a run
            that ran out of memory resumes with it on); not combined with ``compile``.
        store: ``float32`` (lossless, default) or ``uint8`` pixels in the output file.
        log_every: iterations between loss records (the only host synchronisations of the loop).
    """

    ipc: int = 10
    committee_size: int = 2
    committee: str = "auto"
    fixed: list[str] = field(default_factory=list)
    single: str | None = None
    voting: str = "prior"
    temperature: float = 5.0
    iterations: int = 4000
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.9)
    r_bn: float = 0.01
    first_bn_multiplier: float = 10.0
    anchor: float = 0.0
    combine: str = "sum"
    jitter: int | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    shared_crop: bool = True
    init: str = "patches"
    init_candidates: int = 300
    init_crops: int = 5
    init_factor: int | None = None
    init_rank_offset: int = 0
    observer: str | None = None
    classes_per_block: int | None = None
    ipc_per_block: int = 1
    bn_groups: str = "block"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    checkpoint: bool = False
    store: str = "float32"
    log_every: int = 100

    def validate(self, pool_size: int | None = None) -> RecoverConfig:
        """Check ranges and names; raise :class:`ConfigError` with a one-line message."""
        if self.ipc <= 0:
            raise ConfigError(f"ipc must be at least 1 (got {self.ipc})")
        if self.committee_size < 1:
            raise ConfigError(f"committee size must be at least 1 (got {self.committee_size})")
        if pool_size is not None and self.committee_size > pool_size:
            raise ConfigError(f"committee size {self.committee_size} is larger than the pool of {pool_size} experts")
        if self.committee not in (*COMMITTEE_POLICIES, "auto"):
            raise ConfigError(
                f"unknown committee policy {self.committee!r}; choose auto, {', '.join(COMMITTEE_POLICIES)}"
            )
        if self.voting not in VOTING_MODES:
            raise ConfigError(f"unknown voting {self.voting!r}; choose one of {', '.join(VOTING_MODES)}")
        if self.committee == "fixed" and self.fixed and len(self.fixed) != self.committee_size:
            # the fixed list is the committee: a size that disagrees would be ignored (and mislabel the method)
            raise ConfigError(
                f"the fixed committee ({', '.join(self.fixed)}) has {len(self.fixed)} experts but committee_size is "
                f"{self.committee_size}; change one, or pass --committee single for one expert"
            )
        check_init_method(self.init)
        if self.iterations < 1 or self.lr <= 0:
            raise ConfigError("iterations must be >= 1 and lr > 0")
        if self.combine not in COMBINE_RULES:
            raise ConfigError(f"unknown combine {self.combine!r}; choose one of {', '.join(COMBINE_RULES)}")
        if self.anchor < 0:
            raise ConfigError(f"anchor must be >= 0 (got {self.anchor})")
        if self.ipc_per_block < 1 or (self.classes_per_block is not None and self.classes_per_block < 1):
            raise ConfigError("block sizes must be at least 1")
        if self.checkpoint and self.compile:
            raise ConfigError("checkpoint and compile cannot be combined; choose one")
        if self.bn_groups not in ("block", "ipc"):
            raise ConfigError(f"unknown bn_groups {self.bn_groups!r}; choose block or ipc")
        if self.store not in ("float32", "uint8"):
            raise ConfigError(f"unknown store {self.store!r}; choose float32 or uint8")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ConfigError(f"unknown precision {self.precision!r}; choose fp32, bf16 or auto")
        return self

    def policy(self, pool_size: int) -> str:
        """The committee policy actually used (``auto`` resolved)."""
        if self.committee != "auto":
            return self.committee
        if self.committee_size == 1:
            return "single"
        return "pairs" if self.ipc <= math.comb(pool_size, self.committee_size) else "random"


@dataclass
class Unit:
    """A block of IPC indices x a block of classes, optimised together."""

    ipc_indices: list[int]
    classes: list[int]

    @property
    def key(self) -> str:
        return (
            f"ipc{self.ipc_indices[0]:04d}-{self.ipc_indices[-1]:04d}_cls{self.classes[0]:05d}-{self.classes[-1]:05d}"
        )


def plan_units(num_classes: int, cfg: RecoverConfig) -> list[Unit]:
    """Split (IPC index, class) pairs into units, IPC-major (all classes of the first IPC indices first)."""
    cpb = cfg.classes_per_block or min(num_classes, 100)
    units = []
    for k0 in range(0, cfg.ipc, cfg.ipc_per_block):
        ks = list(range(k0, min(cfg.ipc, k0 + cfg.ipc_per_block)))
        for c0 in range(0, num_classes, cpb):
            units.append(Unit(ks, list(range(c0, min(num_classes, c0 + cpb)))))
    return units


@dataclass
class RecoverPlan:
    """Committee and weights of every IPC index, resolved before any optimisation."""

    pool: list[str]
    priors: dict[str, float]
    prior_sources: dict[str, str]
    committees: list[list[str]]
    weights: list[list[float]]
    policy: str


def observer_name(cfg: RecoverConfig, plan: RecoverPlan) -> str:
    """The expert that scores patch crops: the configured one, else the pool's expert of highest prior."""
    return cfg.observer or max(plan.pool, key=lambda n: plan.priors[n])


def plan_committees(experts: list[Expert], cfg: RecoverConfig, seed: int) -> RecoverPlan:
    """Resolve each IPC index's committee (named policy) and voter weights (read from expert metadata)."""
    pool = [e.name for e in experts]
    priors, sources = pool_priors(experts)
    policy = cfg.policy(len(pool))
    best = max(pool, key=lambda n: priors[n])
    committees, weights = [], []
    for k in range(cfg.ipc):
        members = select_committee(
            pool, policy, k, cfg.committee_size, seed=seed, fixed=cfg.fixed or None, single=cfg.single or best
        )
        gen = torch.Generator().manual_seed(derive_seed(seed, "voting", k))
        w = voter_weights([priors[m] for m in members], cfg.voting, cfg.temperature, generator=gen)
        committees.append(list(members))
        weights.append([float(v) for v in w])
    return RecoverPlan(pool, priors, sources, committees, weights, policy)


def config_hash(
    cfg: RecoverConfig,
    plan: RecoverPlan,
    spec: DatasetSpec,
    seed: int,
    experts: list[Expert],
    init_data: str | None = None,
) -> str:
    """Hash of everything that determines the images; units made under another hash are never mixed in.

    ``init_data`` is the fingerprint of the real images that ``real`` / ``patches`` initialisation draws from.
    It enters the hash only when it differs from the experts' training set (a validation carve, another version
    of the data), so that runs initialised from the experts' own data keep their hash (resume).
    """
    # Options added after the first release are hashed only when set, so older runs keep their hash (resume).
    late = {
        "anchor": 0.0,
        "combine": "sum",
        "channels_last": False,
        "compile": False,
        "bn_groups": "block",
    }
    fields = identity_dict(cfg, late)
    # The expert of the `single` policy shapes nothing a committee of N >= 2 makes (a preset naming SRe2L++'s
    # expert keeps the hash of CV-DD sets made without it).
    if cfg.committee_size > 1 and cfg.committee != "single":
        fields["single"] = None
    # Activation checkpointing recomputes the same operations (same pixels), so it is no part of the identity: a
    # run that ran out of memory resumes with it turned on.
    fields.pop("checkpoint", None)
    payload = {
        "cfg": fields,
        "seed": seed,
        "classes": list(spec.classes),
        "size": spec.image_size,
        "committees": plan.committees,
        "weights": plan.weights,
        "experts": {e.name: [e.arch, e.meta.get("dataset_fingerprint"), e.meta.get("test_acc")] for e in experts},
    }
    if cfg.init == "patches":  # the expert scoring the crops: by default the one of highest prior
        payload["observer"] = observer_name(cfg, plan)
    own_data = {e.meta.get("dataset_fingerprint") for e in experts} == {init_data}
    if cfg.init in ("real", "patches") and init_data is not None and not own_data:
        payload["init_data"] = init_data
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RecoverResult:
    """What recover produced.

    Attributes:
        path: ``synthetic.safetensors`` (None while other shards of a job array still have units to finish).
        images: (C * IPC, 3, S, S), class-major (all IPC indices of class 0 first): the pixels the file holds,
            float32 in [0, 1], or uint8 with ``store=uint8`` (a quarter of the memory; every consumer takes either,
            :func:`cvdd.data.augment.unit_float` gives the floats), backed by a copy-on-write memory map of the
            file (read as used; writing to it never changes the file); empty when ``path`` is None.
        labels: int64 (C * IPC,).
        meta: the metadata written beside the tensors (the run manifest when ``path`` is None).
        units_run: units optimised by this call (the others were already finished).
        seconds: wall time of this call.
        units_missing: units not finished yet (by other shards).
    """

    path: Path | None
    images: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any]
    units_run: int
    seconds: float
    units_missing: int = 0


class _Committee:
    """The pool of experts on the device, in their execution layout (channels_last, compiled), built once per run.

    Recover and the benchmarks that reproduce its iteration (:class:`cvdd.benchkit.UnitBench`) call the experts
    through it, so both run them the same way.

    Args:
        models: expert name -> module; moved to ``device``, set to eval mode and frozen (in place).
        device: where the experts run.
        channels_last: convert the experts and their inputs to channels_last.
        compile: call each expert through ``torch.compile`` with a symbolic batch dimension.
    """

    def __init__(
        self,
        models: dict[str, nn.Module],
        device: torch.device,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        self.models = {n: m.to(device).eval() for n, m in models.items()}
        for m in self.models.values():
            for p in m.parameters():
                p.requires_grad_(False)
            if channels_last:
                m.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.compiled = compile
        self._compiled_once: set[str] = set()
        # Compiled wrappers share the modules (and so the BN hooks registered on them later); the plain modules
        # stay in `models` for the observer and the final accuracy check, which run once. Each wrapper compiles
        # when it is first called, so an expert that no committee uses costs nothing. dynamic=False keeps every
        # other dimension static; the batch dimension is marked dynamic at each call (`forward`).
        self._calls: dict[str, Any] = (
            {n: torch.compile(m, dynamic=False) for n, m in self.models.items()} if compile else dict(self.models)
        )

    def forward(self, name: str, x: torch.Tensor, bn_hooks: bool = True) -> torch.Tensor:
        """Logits (B, K) of expert ``name`` on a normalised batch (B, 3, S, S), in the committee's memory format.

        Args:
            name: the expert.
            x: the batch.
            bn_hooks: the expert has its BN-matching hooks attached (recover's forwards always do). A forward
                without them runs uncompiled: dynamo does not guard on module hooks
                (``torch._dynamo.config.skip_nnmodule_hook_guards``, on by default), so a graph compiled without
                them would be reused after they are registered again, and they would never fire (reproduced by
                ``tests/test_precision.py``).
        """
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not bn_hooks:
            return self.models[name](x)
        if not self.compiled:
            return self._calls[name](x)
        # An expert sees as many rows as its committees give it in each unit (70, 60, 80, ... of a 100-image unit),
        # and a graph compiled for one batch size would be compiled again for every other, up to dynamo's limit per
        # forward (which experts of one class share), after which it silently runs eager. One graph with a symbolic
        # batch dimension serves every unit.
        torch._dynamo.maybe_mark_dynamic(x, 0)
        if name in self._compiled_once:
            return self._calls[name](x)
        # The progress bar stands still while an expert compiles: say why.
        log.info("compiling expert %s (torch.compile, once per run; PyTorch caches the result on disk)", name)
        try:  # the first call compiles
            out = self._calls[name](x)
        except torch._dynamo.exc.TorchDynamoException as exc:  # the compiler's: no C++ compiler, a platform, ...
            # A preset that compiles must still run where compilation cannot: the expert runs uncompiled (the BN
            # hooks' pre-hook on the model forgets whatever the failed call recorded). Other errors (a bad input,
            # out of memory) propagate as they are.
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            log.warning("torch.compile failed for expert %s (%s); it runs uncompiled", name, reason)
            self._calls[name] = self.models[name]
            out = self.models[name](x)
        self._compiled_once.add(name)
        return out


@dataclass
class UnitMember:
    """One expert's share of a unit's loss.

    Attributes:
        rows: (R,) rows of the unit (IPC-major, ``n_cls`` per IPC index) whose IPC index has this expert in its
            committee.
        row_weights: (R,) the voter weight of each row's IPC index.
        index_weights: the voter weight of each of those IPC indices, in order.
    """

    rows: torch.Tensor
    row_weights: torch.Tensor
    index_weights: list[float]

    @property
    def voter_weight(self) -> float:
        """W_e: the expert's total voter weight over the unit's IPC indices."""
        return sum(self.index_weights)

    def bn_factor(self, hook: BNMatching, bn_groups: str) -> float:
        """Set up ``hook`` for ``bn_groups`` and return the factor of its BN loss in the expert's term.

        ``block``: one statistic over all the expert's rows, weighted by W_e. ``ipc``: one statistic per IPC index
        (``n_cls`` consecutive rows), each weighted inside the loss by its index's voter weight, so the BN part is
        Σ_k w_k BN(index k), what separate per-index batches give; the factor is then 1.
        """
        if bn_groups == "ipc":
            hook.set_groups(torch.tensor(self.index_weights, device=self.rows.device))
            return 1.0
        return self.voter_weight


def unit_members(plan: RecoverPlan, ipc_indices: list[int], n_cls: int, device: torch.device) -> dict[str, UnitMember]:
    """Each expert of a unit (in pool order) with its rows and voter weights; the one definition of a unit's loss
    terms, shared by recover and the benchmarks that reproduce its iteration (:class:`cvdd.benchkit.UnitBench`)."""
    order = {name: i for i, name in enumerate(plan.pool)}
    names = sorted({m for k in ipc_indices for m in plan.committees[k]}, key=order.__getitem__)
    members = {}
    for name in names:
        idx: list[int] = []
        row_w: list[float] = []
        index_w: list[float] = []
        for j, k in enumerate(ipc_indices):
            if name in plan.committees[k]:
                wk = plan.weights[k][plan.committees[k].index(name)]
                idx += range(j * n_cls, (j + 1) * n_cls)
                row_w += [wk] * n_cls
                index_w.append(wk)
        members[name] = UnitMember(torch.tensor(idx, device=device), torch.tensor(row_w, device=device), index_w)
    return members


def _unit_init(
    unit: Unit,
    cfg: RecoverConfig,
    spec: DatasetSpec,
    data: RealDataset | None,
    seed: int,
    device: torch.device,
    init_cache: InitCache | None,
) -> torch.Tensor:
    """Initial normalised pixels of a unit: float32 (len(ipc) * len(classes), 3, S, S), IPC-major."""
    if cfg.init == "gaussian":
        return torch.cat(
            [gaussian_init(1, spec.image_size, seed, k, c) for k in unit.ipc_indices for c in unit.classes]
        ).to(device)
    assert data is not None and init_cache is not None
    rows = [init_cache.get(c, k) for k in unit.ipc_indices for c in unit.classes]
    return Normalize(data.spec)(torch.stack(rows).to(device))


def _class_init(
    cfg: RecoverConfig, data: RealDataset, observer: nn.Module | None, seed: int, device: torch.device
) -> Callable[[int], torch.Tensor]:
    """class index -> its initial images, uint8 (ipc, 3, S, S): random real images or scored real patches."""

    def make(c: int) -> torch.Tensor:
        if cfg.init == "real":
            return real_init(data, c, cfg.ipc, seed)
        assert observer is not None
        factor = cfg.init_factor or (1 if data.spec.image_size <= 64 else 2)
        return patch_init(
            data,
            c,
            cfg.ipc,
            observer,
            seed,
            candidates=cfg.init_candidates,
            crops=cfg.init_crops,
            factor=factor,
            rank_offset=cfg.init_rank_offset,
            device=device,
        )

    return make


def _optimise_unit(
    x0: torch.Tensor,
    targets: torch.Tensor,
    unit: Unit,
    plan: RecoverPlan,
    committee: _Committee,
    cfg: RecoverConfig,
    spec: DatasetSpec,
    gen: torch.Generator,
    device: torch.device,
    progress_bar: Any,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Optimise one unit's pixels (rows IPC-major: row i has IPC index unit.ipc_indices[i // n_classes]).

    Returns:
        Final normalised pixels (n, 3, S, S) and the loss records.
    """
    precision = resolve_precision(cfg.precision, device)
    mean, std = Normalize(spec).stats(device)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    jitter = spec.jitter if cfg.jitter is None else cfg.jitter
    jitter_gen = gen if gen.device.type == "cpu" else torch.Generator().manual_seed(int(gen.initial_seed()))
    n_cls = len(unit.classes)
    members = unit_members(plan, unit.ipc_indices, n_cls, device)
    names = list(members)
    rows = {n: m.rows for n, m in members.items()}
    row_w = {n: m.row_weights for n, m in members.items()}
    bn_w = {n: m.voter_weight for n, m in members.items()}
    records: list[dict[str, float]] = []
    hooks = {name: BNMatching(committee.models[name], first_multiplier=cfg.first_bn_multiplier) for name in names}
    bn_scale = {name: members[name].bn_factor(hooks[name], cfg.bn_groups) for name in names}
    with contextlib.ExitStack() as stack:  # whatever was entered is left again, also when a later entry raises
        for h in hooks.values():
            stack.enter_context(h)
        if cfg.checkpoint:  # entered after the hooks, so the recomputation in the backward pass replays them
            for name in names:
                stack.enter_context(checkpointed(committee.models[name]))
        for t in range(cfg.iterations):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(t, cfg.iterations, cfg.lr)
            xa = recover_augment(
                x,
                gen,
                spec.image_size,
                jitter,
                scale=cfg.crop_scale,
                shared_crop=cfg.shared_crop,
                jitter_generator=jitter_gen,
            )
            # The loss is a sum over experts, so each expert's term is backpropagated as soon as it is computed
            # (into a leaf copy of the augmented batch): its activations are freed before the next expert runs,
            # and peak memory is that of the largest expert, not of the whole committee.
            xa_leaf = xa.detach().requires_grad_(True)
            loss = x.new_zeros(())
            parts: dict[str, torch.Tensor] = {}
            opt.zero_grad(set_to_none=True)
            logging_now = (t + 1) % cfg.log_every == 0 or t + 1 == cfg.iterations
            # Per-expert pixel gradients are kept apart only when a combination rule needs them, or to measure
            # the conflict between voters at a logged iteration (a committee of one has none).
            separate = len(names) > 1 and (cfg.combine != "sum" or logging_now)
            grads: list[torch.Tensor] = []
            for name in names:
                full = len(rows[name]) == len(xa)
                # index_select, not xa_leaf[rows]: its backward is an index_add (0.05 ms for 70 of 100 images on a
                # CPU) where advanced indexing's is an accumulating index_put (0.6 ms); the rows are distinct, so
                # both give the same gradient.
                sub = xa_leaf if full else xa_leaf.index_select(0, rows[name])
                with autocast(device, precision):
                    logits = committee.forward(name, sub)
                tgt = targets if full else targets[rows[name]]
                ce_rows = nn.functional.cross_entropy(logits.float(), tgt, reduction="none")
                # Mean CE over each IPC index's images, weighted by that index's voter weight.
                ce = (ce_rows * row_w[name]).sum() / n_cls
                bn = hooks[name].loss()
                term = ce + cfg.r_bn * bn_scale[name] * bn
                if separate:
                    grads.append(torch.autograd.grad(term, xa_leaf)[0])
                else:
                    term.backward()
                loss = loss + term.detach()
                parts[f"ce/{name}"] = ce.detach()
                # Logged as the voter-weighted mean BN loss per index (with groups the hook's loss carries the
                # weights, Σ_k w_k BN_k), so that the curves of bn_groups=block and =ipc read alike.
                parts[f"bn/{name}"] = bn.detach() * (bn_scale[name] / bn_w[name])
                del logits, ce_rows, ce, bn, term
            if separate:
                if logging_now:
                    parts.update(_gradient_conflict(grads, names))
                xa_leaf.grad = combine_gradients(grads, [bn_w[n] for n in names], cfg.combine)
            xa.backward(xa_leaf.grad)  # through the crop, flip and jitter into the pixels
            if cfg.anchor > 0:
                drift = (x - x0).pow(2).mean()
                (cfg.anchor * drift).backward()
                loss = loss + cfg.anchor * drift.detach()
                parts["anchor"] = drift.detach()
            opt.step()
            clamp_to_valid(x, mean, std)
            if progress_bar is not None:
                progress_bar.update()
            if logging_now:
                rec = {"iteration": t + 1, "loss": float(loss.detach())}
                rec.update({k: float(v) for k, v in parts.items()})
                records.append(rec)
                tracking.log(f"recover {unit.key}", rec, t + 1)
                if progress_bar is not None:
                    progress_bar.set_postfix(loss=f"{rec['loss']:.3f}")
    return x.detach(), records


COMBINE_RULES = ("sum", "gradnorm", "pcgrad")


def combine_gradients(grads: list[torch.Tensor], weights: list[float], rule: str) -> torch.Tensor:
    """Combine the experts' pixel gradients of one iteration.

    Args:
        grads: one gradient per expert, each shaped like the augmented batch (B, 3, S, S); each already carries
            its expert's voter weight (it is the gradient of that expert's weighted term).
        weights: each expert's total voter weight in the unit (used by ``gradnorm``).
        rule: ``sum`` (the method: the gradient of the summed loss), ``gradnorm`` (each expert's gradient
            scaled to unit norm and weighted by its share of the voter weight, the result scaled by the sum of
            the norms, so that no expert dominates by gradient size alone), or ``pcgrad`` (each gradient loses
            its component along any other expert's gradient it conflicts with, negative dot product, before
            summing).

    Returns:
        The combined gradient (B, 3, S, S).
    """
    if rule == "sum" or len(grads) == 1:
        return torch.stack(grads).sum(0)
    if rule == "gradnorm":
        norms = [g.norm().clamp_min(1e-12) for g in grads]
        total = sum(weights)
        direction = sum((w / total) * g / n for g, w, n in zip(grads, weights, norms))
        return direction * torch.stack(norms).sum()
    if rule == "pcgrad":
        out = []
        for i, g in enumerate(grads):
            g = g.clone()
            for j, h in enumerate(grads):
                if i != j:
                    dot = (g * h).sum()
                    if dot < 0:
                        g = g - dot / h.pow(2).sum().clamp_min(1e-12) * h
            out.append(g)
        return torch.stack(out).sum(0)
    raise ConfigError(f"unknown gradient combination {rule!r}; choose one of {', '.join(COMBINE_RULES)}")


def _gradient_conflict(grads: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Cosine between every pair of experts' pixel gradients (negative: the voters pull pixels apart)."""
    out = {}
    cosines = []
    for i in range(len(grads)):
        for j in range(i + 1, len(grads)):
            c = nn.functional.cosine_similarity(grads[i].flatten(), grads[j].flatten(), dim=0)
            out[f"cos/{names[i]}|{names[j]}"] = c
            cosines.append(c)
    out["cos/mean"] = torch.stack(cosines).mean()
    return out


def _unit_paths(out: Path, unit: Unit) -> tuple[Path, Path]:
    base = out / "units" / unit.key
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


MANIFEST = "recover.json"
#: Folder of a recover run's initial images (:class:`cvdd.synthesis.init.InitCache`), one sub-folder per config hash.
INIT_DIR = ".init"


def _manifest(
    cfg: RecoverConfig,
    plan: RecoverPlan,
    spec: DatasetSpec,
    seed: int,
    chash: str,
    experts: list[Expert],
    units: list[Unit],
    method: str,
) -> dict[str, Any]:
    """Everything needed to assemble the units without the experts (``cvdd merge``)."""
    meta = base_metadata("recover-manifest", spec)
    meta.update(
        {
            "method": method,
            "ipc": cfg.ipc,
            "seed": seed,
            "config": to_dict(cfg),
            "config_hash": chash,
            "committee_policy": plan.policy,
            "pool": plan.pool,
            "priors": plan.priors,
            "prior_sources": plan.prior_sources,
            "committees": plan.committees,
            "weights": plan.weights,
            "experts": {
                e.name: {"arch": e.arch, "test_acc": e.test_acc, "path": str(e.meta.get("path", ""))} for e in experts
            },
            "units": [{"key": u.key, "ipc_indices": u.ipc_indices, "classes": u.classes} for u in units],
        }
    )
    return meta


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = read_json_object(path, "run manifest")
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}; remove it and re-run recover") from None
    if manifest.get("kind") == "recover-manifest" and not isinstance(manifest.get("units"), list):
        raise ArtifactError(f"unreadable run manifest {path}: no list of units; remove it and re-run recover")
    return manifest


def manifest_units(manifest: dict[str, Any], path: Path) -> list[Unit]:
    """The units a run manifest lists, or a one-line :class:`ArtifactError` when an entry is malformed (edited)."""
    units = []
    for u in manifest.get("units") or []:
        fields = [u.get("ipc_indices"), u.get("classes")] if isinstance(u, dict) else [None]
        if not all(isinstance(f, list) and f and all(type(i) is int for i in f) for f in fields):
            raise ArtifactError(
                f"unreadable run manifest {path}: a unit without its lists of IPC indices and classes ({str(u)[:60]}); "
                "remove it and re-run recover"
            )
        units.append(Unit(*fields))
    return units


#: Fields of a unit's metadata that the assembled set records (cvdd writes them all; missing ones were edited away).
_UNIT_FIELDS = ("unit", "records", "expert_accuracy", "seconds", "mean_abs_change")


def _check_unit(out_dir: Path, unit: Unit, chash: str) -> tuple[str, dict[str, Any] | None]:
    """The unit's state (see :func:`_unit_state`) and its metadata when it could be read."""
    tensors_path, meta_path = _unit_paths(out_dir, unit)
    if not (meta_path.is_file() and tensors_path.is_file()):
        return "missing", None
    try:
        meta = read_json_object(meta_path)
    except ArtifactError:
        return "corrupt", None
    if meta.get("config_hash") != chash:
        return "other", meta
    try:
        verify_checksum(tensors_path, meta)
    except ArtifactError:
        return "corrupt", meta
    if any(k not in meta for k in _UNIT_FIELDS):
        return "corrupt", meta
    return "done", meta


def _unit_state(out_dir: Path, unit: Unit, chash: str) -> str:
    """``done`` (files present, same config, checksum verified), ``missing``, ``other`` config or ``corrupt``."""
    return _check_unit(out_dir, unit, chash)[0]


def recover_images(
    experts: list[Expert],
    cfg: RecoverConfig,
    out: str | os.PathLike[str],
    *,
    data: RealDataset | None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    restart: bool = False,
    method: str | None = None,
    shard: dd.Shard | None = None,
) -> RecoverResult:
    """Run recover for a committee pool and write the synthetic set.

    Units are split across the ranks of a ``torchrun`` job (rank 0 assembles), or across independent jobs
    with ``shard`` (the job that finds every unit finished assembles; ``cvdd merge`` does it otherwise).

    Args:
        experts: the pool (loaded once, kept on the device, frozen, eval mode).
        cfg: hyper-parameters.
        out: output folder (units in ``out/units``; final ``out/synthetic.safetensors``, ``.json``, ``grid.png``).
        data: the real dataset (needed by ``patches`` and ``real`` initialisation).
        seed: run seed.
        device: where to optimise.
        progress: progress bar with iterations/s.
        restart: discard finished units made with another configuration instead of refusing.
        method: name recorded in the metadata (default: ``sre2l++`` for N = 1, else ``cvdd``).
        shard: this job's share of the units (``Shard(i, n)``); default: this rank's in a process group.

    Returns:
        A :class:`RecoverResult`.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    if not experts:
        raise ConfigError("no experts given to recover")
    spec = experts[0].spec
    for e in experts[1:]:
        spec.check_compatible(e.spec, f"expert {e.name}")
    if data is not None:
        data.spec.check_compatible(spec, "the experts' dataset")
    cfg.validate(len(experts))
    if cfg.init in ("patches", "real") and data is None:
        raise ConfigError(f"init '{cfg.init}' needs the real dataset (give --dataset)")
    dev = resolve_device(device)
    plan = plan_committees(experts, cfg, seed)
    chash = config_hash(cfg, plan, spec, seed, experts, data.fingerprint if data is not None else None)
    out_dir = Path(out)
    (out_dir / "units").mkdir(parents=True, exist_ok=True)
    units = plan_units(spec.num_classes, cfg)
    method = method or ("sre2l++" if cfg.committee_size == 1 else "cvdd")
    if shard is None:
        shard = dd.current_shard()
    manifest = _manifest(cfg, plan, spec, seed, chash, experts, units, method)
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        old = _read_manifest(manifest_path)
        if old.get("config_hash") != chash and not restart:
            raise ArtifactError(
                f"{out_dir} holds recover units made with another configuration ({MANIFEST}: config hash "
                f"{old.get('config_hash')} != {chash}); choose another --out, remove that folder, or pass "
                "--restart (cvdd recover, cvdd distill) to discard them"
            )
    dd.barrier()  # every rank has read the old manifest before rank 0 replaces it

    # Each job checks (and with --restart cleans) only its own units: shards never touch each other's files.
    todo = []
    reused_builds = []
    for unit in shard.take(units):
        state, unit_meta = _check_unit(out_dir, unit, chash)
        if state == "done":
            reused_builds.append(unit_meta.get("build") if unit_meta else None)
            continue
        if state != "missing":
            if not restart:
                why = (
                    "another configuration"
                    if state == "other"
                    else "a checksum mismatch or missing metadata fields (a tampered or truncated file)"
                )
                raise ArtifactError(
                    f"{out_dir} holds recover unit {unit.key} with {why}; choose another --out, remove that "
                    "folder, or pass --restart (cvdd recover, cvdd distill) to discard it"
                )
            for f in _unit_paths(out_dir, unit):
                f.unlink(missing_ok=True)
        todo.append(unit)
    if dd.is_main() or shard.count > 1:
        if not manifest_path.is_file() or _read_manifest(manifest_path).get("config_hash") != chash:
            atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
        stale = out_dir / "synthetic.json"
        if todo and stale.exists():
            stale.unlink(missing_ok=True)  # the assembled set is stale once a unit is (re)made

    mixed = other_builds(f"finished recover units in {out_dir}", reused_builds)
    if mixed:
        log.warning("%s; --restart recovers every unit with this build", mixed)
    sources_note = {n: s for n, s in plan.prior_sources.items() if s != "prior"}
    if sources_note and cfg.voting == "prior" and cfg.committee_size > 1:
        log.warning(
            "prior not measured for %s: voting uses %s instead (run `cvdd prior` for the method's prior)",
            ", ".join(sorted(sources_note)),
            "equal priors" if "equal" in sources_note.values() else "the training accuracy of the last squeeze epoch",
        )
    # channels_last is opt-in here (unlike training): it changes the arithmetic, which the units of one run (resumed,
    # or the shards of a job array) should share. Changes to cvdd itself can still move the last bits between
    # versions without changing the config hash (the CPU crop of 2026-11-27 did, at float rounding).
    committee = _Committee(
        {e.name: e.model for e in experts}, dev, channels_last=bool(cfg.channels_last), compile=cfg.compile
    )
    observer = None
    if cfg.init == "patches":
        obs_name = observer_name(cfg, plan)
        if obs_name not in committee.models:
            raise ConfigError(f"observer {obs_name!r} is not in the pool ({', '.join(plan.pool)})")
        observer = committee.models[obs_name]
    # Initial images on disk, not in memory (see InitCache); the folder of another configuration is stale. One
    # process (or torchrun's rank 0, whose ranks share this configuration) sweeps; independent shards leave it to
    # the assembly, since a shard cannot know that the others run this configuration too.
    init_root = out_dir / INIT_DIR
    if dd.is_main() and (dd.active() or shard.count == 1) and init_root.is_dir():
        for stale in init_root.iterdir():
            if stale.name != chash:
                shutil.rmtree(stale, ignore_errors=True)
    init_cache = InitCache(init_root / chash, _class_init(cfg, data, observer, seed, dev)) if data is not None else None
    total_iters = len(todo) * cfg.iterations
    bar = tqdm(
        total=total_iters,
        desc=f"recover (shard {shard})" if shard.count > 1 else "recover",
        unit="it",
        disable=not progress or not todo or not dd.is_main(),
        leave=False,
    )
    for unit in todo:
        t_unit = time.perf_counter()
        x0 = _unit_init(unit, cfg, spec, data, seed, dev, init_cache).float()
        targets = torch.tensor([c for _ in unit.ipc_indices for c in unit.classes], device=dev)
        gen = make_generator(derive_seed(seed, "recover", unit.ipc_indices[0], unit.classes[0]), dev)
        x, records = _optimise_unit(x0, targets, unit, plan, committee, cfg, spec, gen, dev, bar)
        normalize = Normalize(spec)
        pixels = normalize.denormalize(x).clamp(0, 1)
        with torch.no_grad():
            acc = {n: float((committee.models[n](x).argmax(1) == targets).float().mean()) for n in committee.models}
        save_tensors(
            _unit_paths(out_dir, unit)[0],
            {
                "images": pixels,
                "labels": targets,
                "ipc_index": torch.tensor([k for k in unit.ipc_indices for _ in unit.classes]),
            },
            {
                "kind": "recover-unit",
                "config_hash": chash,
                "build": build_stamp(),
                "unit": unit.key,
                "ipc_indices": unit.ipc_indices,
                "classes": unit.classes,
                "records": records,
                "expert_accuracy": acc,
                "seconds": time.perf_counter() - t_unit,
                "mean_abs_change": float((x - x0).abs().mean() * torch.tensor(spec.std).mean() * 255),
            },
        )
    bar.close()
    if dd.active():
        dd.barrier()  # all ranks' units are on disk
        if dd.is_main():
            res = _assemble(out_dir, manifest, len(todo), time.perf_counter() - t0)
        dd.barrier()
        if not dd.is_main():
            images, labels, meta = load_synthetic(out_dir)
            res = RecoverResult(out_dir / "synthetic.safetensors", images, labels, meta, len(todo), 0.0)
        res.seconds = time.perf_counter() - t0
        return res
    missing = [u.key for u in units if _unit_state(out_dir, u, chash) != "done"]
    if missing:
        log.info(
            "%d of %d units still to do by other shards; `cvdd merge %s` assembles them",
            len(missing),
            len(units),
            out_dir,
        )
        empty = torch.zeros(0)
        return RecoverResult(None, empty, empty.long(), manifest, len(todo), time.perf_counter() - t0, len(missing))
    return _assemble(out_dir, manifest, len(todo), time.perf_counter() - t0)


def merge_units(out: str | os.PathLike[str]) -> RecoverResult:
    """Assemble the units of a recover run made by independent shards (``cvdd merge``).

    Every unit listed in the run's manifest must be present with the manifest's config hash and a valid
    checksum; the error names the first unit that is not.
    """
    t0 = time.perf_counter()
    out_dir = Path(out)
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{out_dir} is not a recover run (no {MANIFEST}); give the --out of the recover shards")
    manifest = _read_manifest(manifest_path)
    check_kind(manifest, "recover-manifest", manifest_path)
    units = manifest_units(manifest, manifest_path)
    states = {u.key: _unit_state(out_dir, u, manifest["config_hash"]) for u in units}
    bad = {k: v for k, v in states.items() if v != "done"}
    if bad:
        first = next(iter(bad))
        why = {
            "missing": "not finished",
            "corrupt": "checksum mismatch or missing metadata fields (a tampered or truncated file)",
            "other": "made with another configuration",
        }[bad[first]]
        raise ArtifactError(
            f"{out_dir}: {len(bad)} of {len(units)} units not finished or invalid (first: {first}, {why}); "
            f"run the missing shards again (recover --restart recomputes invalid units)"
        )
    return _assemble(out_dir, manifest, 0, time.perf_counter() - t0)


def _assemble(out_dir: Path, manifest: dict[str, Any], units_run: int, seconds: float) -> RecoverResult:
    """Gather the finished units into one class-major synthetic set, its metadata and a PNG grid."""
    spec = DatasetSpec.from_dict(manifest["dataset"])
    chash = manifest["config_hash"]
    units = manifest_units(manifest, out_dir / MANIFEST)
    c, ipc = spec.num_classes, int(manifest["ipc"])
    cfg = manifest["config"]
    filled = torch.zeros(c * ipc, dtype=torch.bool)
    for unit in units:
        for k in unit.ipc_indices:
            filled[torch.tensor(unit.classes, dtype=torch.long) * ipc + k] = True
    if not bool(filled.all()):
        raise ArtifactError(f"{out_dir}: some units are missing; re-run recover to finish them")
    # The set goes to its file unit by unit (StreamedTensorFile): no whole copy of it is ever in memory (28 GiB of
    # float32 at ImageNet-1K IPC 50; assembling it in memory and saving it peaked at 1.5x that). A uint8 set is
    # quantised unit by unit.
    uint8 = cfg["store"] == "uint8"
    shape = (c * ipc, 3, spec.image_size, spec.image_size)
    path = out_dir / "synthetic.safetensors"
    labels = torch.arange(c).repeat_interleave(ipc)
    layout = {"images": (torch.uint8 if uint8 else torch.float32, shape), "labels": (torch.int64, (c * ipc,))}
    unit_meta = []
    with StreamedTensorFile(path, layout) as out:
        out.write_rows("labels", 0, labels)
        for unit in units:
            tensors, meta = load_tensors(_unit_paths(out_dir, unit)[0])
            if meta.get("config_hash") != chash:
                raise ArtifactError(f"unit {unit.key} in {out_dir} was made with another configuration")
            pixels = (tensors["images"] * 255).round().to(torch.uint8) if uint8 else tensors["images"].float()
            for i, (k, cls) in enumerate((k, cls) for k in unit.ipc_indices for cls in unit.classes):
                out.write_rows("images", cls * ipc + k, pixels[i : i + 1])
            unit_meta.append({k: meta[k] for k in _UNIT_FIELDS})
            unit_meta[-1]["build"] = meta.get("build")
        meta = base_metadata(SYNTHETIC_KIND, spec)
        skip = ("kind", "units", "dataset", "cvdd_version", "torch_version", "build", "created")
        meta.update({k: v for k, v in manifest.items() if k not in skip})
        meta.update(
            {
                "order": "class-major: image i has class i // ipc and IPC index i % ipc",
                "units": unit_meta,
                "seconds_this_run": seconds,
                "units_run_this_call": units_run,
                "seconds_all_units": sum(u["seconds"] for u in unit_meta),
                # The builds that made the units (more than one when a run was resumed after cvdd or torch changed).
                "unit_builds": distinct_builds([u["build"] for u in unit_meta]),
            }
        )
        out.finish(meta)
    # The images returned are the stored ones (quantised for uint8), as `load_synthetic` and every other rank of
    # a torchrun job read them (the float pixels before quantisation made rank 0 evaluate other images, and a rerun
    # evaluate other images than the first run), mapped from the file rather than held in memory.
    tensors, meta = load_tensors(path, mmap=True, verify=False)  # just written and hashed: no second read
    images, labels = tensors["images"], tensors["labels"]
    shutil.rmtree(out_dir / INIT_DIR, ignore_errors=True)  # every unit is finished: no initial image is needed again
    save_grid(images, spec, ipc, out_dir / "grid.png")
    atomic_write_text(out_dir / "config.json", json.dumps({"recover": cfg, "seed": manifest["seed"]}, indent=1))
    return RecoverResult(path, images, labels, meta, units_run, seconds)


def save_grid(
    images: torch.Tensor, spec: DatasetSpec, ipc: int, path: Path, max_cols: int = 10, max_rows: int = 20
) -> None:
    """A PNG grid for people: one row per class (first ``max_rows``), the first ``max_cols`` IPC indices."""
    from PIL import Image

    rows = min(spec.num_classes, max_rows)
    cols = min(ipc, max_cols)
    s, pad = spec.image_size, 2
    canvas = torch.ones(3, rows * (s + pad) + pad, cols * (s + pad) + pad)
    for r in range(rows):
        for k in range(cols):
            y, x = pad + r * (s + pad), pad + k * (s + pad)
            canvas[:, y : y + s, x : x + s] = unit_float(images[r * ipc + k])
    arr = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    tmp = temp_sibling(path)
    Image.fromarray(arr).save(tmp, format="PNG")
    fsync_file(tmp)  # on disk before the rename (a crash leaves the old grid or the new one, never an empty file)
    os.replace(tmp, path)


def load_synthetic(
    path: str | os.PathLike[str], spec: DatasetSpec | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Load a synthetic set: images (N, 3, S, S) as stored, int64 labels (N,), metadata.

    Images are float32 in [0, 1], or uint8 for a set stored as uint8 (``store=uint8``): kept as bytes, a quarter of
    a float32 copy; :func:`cvdd.data.augment.unit_float` gives their floats. Both are backed by a copy-on-write
    memory map of the file (read as they are used; writing to them never changes the file).

    Accepts the ``synthetic.safetensors`` path or its folder; checks it fits ``spec`` when given.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "synthetic.safetensors"
    tensors, meta = load_tensors(p, mmap=True)  # pages are read as they are used: a large set needs no copy in memory
    stored = check_kind(meta, SYNTHETIC_KIND, p)
    if spec is not None:
        try:
            spec.check_compatible(stored, f"synthetic set {p}")
        except Exception as exc:
            raise ArtifactError(str(exc)) from None
    images = tensors["images"]
    return (images if images.dtype == torch.uint8 else images.float()), tensors["labels"].long(), meta


def export_imagefolder(path: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str = "png") -> int:
    """Moved to :func:`cvdd.synthesis.export.export_synthetic` (more formats); kept so old imports work.

    Returns:
        Number of images written.
    """
    from cvdd.synthesis.export import export_synthetic

    return export_synthetic(path, out, fmt)
