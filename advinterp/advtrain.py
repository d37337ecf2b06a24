"""Adversarial fine-tuning with the feature-consistency loss (the paper's eq. 5–9).

From a normally trained model (a checkpoint, or, as in the paper, a pretrained
ImageNet model by name and weights file), each batch is trained on

    α·CE(f(x), y) + (1 − α)·CE(f(x_fgsm), y) + β·d(φ(x), φ(x_fgsm)),

with ``d`` the squared Euclidean distance between the feature vectors, by
default relative to the features' squared norms so that one β suits every
architecture (``consistency``: ``"relative"``, ``"mean"`` per feature, or
``"sum"`` as the paper writes it; see :func:`consistency_loss`), averaged over
the batch, and ``x_fgsm`` FGSM examples made on the fly, ε drawn uniformly per
image from ``eps_range``. ``φ`` is the penultimate feature vector (the input of
the last ``Linear``; default), the logits (adversarial logit pairing) or any
named layer's output. ``β = 0`` is plain adversarial training (the ``-AT``
baseline); otherwise the model is named ``<arch>-Adv``.

One step is two forward passes and three backward walks over the network, the
floor when β > 0:

1. a training-mode forward of the clean batch (``x`` requires grad) gives the
   clean logits and ``φ(x)``;
2. ``torch.autograd.grad`` of the clean cross-entropy w.r.t. ``x`` only (no
   parameter gradients; the graph is kept) gives the FGSM direction;
3. a training-mode forward of ``x_fgsm`` gives its logits and ``φ(x_fgsm)``;
4. one backward of the total loss into the parameters, through both graphs
   (the consistency term couples them, so the clean graph is walked twice: the
   x-gradient of step 2 is needed before ``x_fgsm`` exists).

Batch norm: no forward pass exists only for the attack, so the running
statistics see each clean batch once and each adversarial batch once, like any
other training data, and no eval-mode or throw-away pass touches them. The
FGSM direction comes from the training-mode (batch-statistics) forward rather
than an eval-mode one; for the sign of a gradient the difference is small, and
it saves a third forward and backward pass (crafting in eval mode, then one
forward of ``cat([x, x_fgsm])``, costs ≈ 3 passes each way instead of 2).

Several processes: under ``torchrun --nproc-per-node N`` the run is data
parallel (DistributedDataParallel; gloo on CPUs, NCCL with one GPU per
process) and matches one process with the same ``--batch-size``, which is the
global batch (see :mod:`advinterp.distributed`): every process draws the same
shuffled batch, augmentation and per-image ε, keeps its rows, and the averaged
gradients are the global batch's. From an image folder each process decodes
only its rows, each image augmented from its own seed (see
:mod:`advinterp.train`). Batch norm uses the global batch's statistics in
training mode (:class:`~advinterp.distributed.GlobalBatchNorm`, as
``SyncBatchNorm`` would on GPUs), so its running statistics and its part of
the gradients match too. What remains is float rounding (sums in another
order), amplified where it flips the sign of a near-zero FGSM gradient (that
pixel moves by 2ε): runs agree to float32 noise, not bit for bit
(``tests/test_advtrain_ddp.py`` measures both). The test set is evaluated, and
the checkpoint written, by process 0 only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from advinterp import train as train_mod
from advinterp.attacks.fgsm import fgsm_step
from advinterp.data import TensorImageSet, open_dataset
from advinterp.device import default_workers
from advinterp.distributed import World, joined
from advinterp.errors import UserError
from advinterp.io import read_json
from advinterp.metrics.accuracy import table2
from advinterp.models import load_model
from advinterp.progress import progress as tqdm
from advinterp.record import Recorder
from advinterp.train import (
    check_data,
    check_schedule,
    eval_batch_size,
    eval_set,
    on_device,
    seed_per_process,
    sgd,
    sync_batch_norm,
    training_precision,
)


@dataclass
class AdvTrainConfig:
    init: str = ""
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.003
    momentum: float = 0.9
    weight_decay: float = 5e-5
    alpha: float = 0.5
    beta: float = 1.0
    consistency: str = "relative"
    eps_min: float = 4 / 255
    eps_max: float = 16 / 255
    phi: str = "penultimate"
    shift: int = 1
    flip: bool = True
    seed: int = 0
    data: str = "fashion-mnist"
    data_root: str | None = None
    limit: int | None = None
    eval_limit: int | None = 1000
    #: weights of an ImageNet model named by ``init`` (see :func:`advinterp.models.load_model`)
    weights: str | None = None
    #: held-out images (default: the test split of ``data``; none for an image folder)
    eval_data: str | None = None

    def check(self) -> None:
        if not self.init:
            raise UserError(
                "give the normally trained model to start from (--init: a checkpoint, or an "
                "ImageNet model name with --weights)"
            )
        check_schedule(self)
        if not (0 <= self.alpha <= 1 and self.beta >= 0 and math.isfinite(self.beta)):
            raise UserError(f"need 0 ≤ --alpha ≤ 1 and --beta ≥ 0, got {self.alpha}, {self.beta}")
        if self.consistency not in CONSISTENCY:
            raise UserError(
                f"unknown --consistency {self.consistency!r}: use {', '.join(CONSISTENCY)}"
            )
        if not (0 < self.eps_min <= self.eps_max <= 1):
            raise UserError(
                f"need 0 < --eps-min ≤ --eps-max ≤ 255 (0–255 units), got "
                f"{self.eps_min * 255:g}, {self.eps_max * 255:g}"
            )
        if not 0 <= self.shift <= 8:
            raise UserError("need 0 ≤ --shift ≤ 8")
        check_data(self.data, self.eval_data)


#: How the consistency term ``d(φ(x), φ(x_adv))`` is scaled (``--consistency``).
CONSISTENCY = ("relative", "mean", "sum")


def consistency_loss(
    logits_clean: torch.Tensor,
    logits_adv: torch.Tensor,
    feat_clean: torch.Tensor | None,
    feat_adv: torch.Tensor | None,
    y: torch.Tensor,
    alpha: float = 0.5,
    beta: float = 1.0,
    scale: str = "relative",
) -> torch.Tensor:
    """α·CE(clean) + (1−α)·CE(adv) + β·(batch mean of the distance between φ(x) and φ(x_adv)).

    The distance, by ``scale``:

    - ``"sum"``: ‖φ(x) − φ(x_adv)‖², the paper's squared Euclidean distance as written.
      Its size grows with the width of φ and the size of its values (``alexnet``'s
      4096-d features start near 35 against a cross-entropy near 2), so one β does
      not suit every architecture;
    - ``"mean"``: the same, divided by the number of features;
    - ``"relative"`` (default): ‖φ(x) − φ(x_adv)‖² / (‖φ(x)‖² + ‖φ(x_adv)‖²), per
      image, the denominator taken as a constant (detached, so that the term cannot
      be lowered by inflating the features). It lies between 0 (the features agree)
      and 2 (opposite), is about 1 for unrelated features and does not change when
      φ is rescaled, whatever the architecture, so one β means the same trade-off
      for every model. An image whose two feature vectors are both zero adds 0.

    Cross-entropies are batch means. With ``beta == 0`` the features are not
    used (they may be ``None``) and this is the plain adversarial-training loss.
    """
    loss = alpha * F.cross_entropy(logits_clean, y) + (1 - alpha) * F.cross_entropy(logits_adv, y)
    if beta:
        if scale not in CONSISTENCY:
            raise UserError(f"unknown consistency scale {scale!r}: use {', '.join(CONSISTENCY)}")
        clean = feat_clean.flatten(1)
        dist = (clean - feat_adv.flatten(1)).pow(2).sum(1)
        if scale == "mean":
            dist = dist / clean.shape[1]
        elif scale == "relative":
            norms = clean.detach().pow(2).sum(1) + feat_adv.detach().flatten(1).pow(2).sum(1)
            dist = dist / norms.clamp_min(torch.finfo(norms.dtype).tiny)
        loss = loss + beta * dist.mean()
    return loss


def draw_eps(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    """One ε per image, uniform in [lo, hi]."""
    return lo + (hi - lo) * torch.rand(n, generator=gen)


class FeatureTap:
    """Keeps ``φ`` of the latest forward pass (with its autograd graph) in ``self.value``.

    ``"penultimate"``: the input of the last ``nn.Linear`` of ``model.net`` (e.g.
    of ``fc``); ``"logits"``: nothing is hooked (use the model's output); a layer
    name: that layer's output. Recorded by a :class:`~advinterp.record.Recorder`
    that keeps the graph, on every forward pass of the model or of its DDP wrapper.
    """

    def __init__(self, model: nn.Module, phi: str):
        self.phi, self._recorder = phi, None
        if phi == "logits":
            return
        if phi == "penultimate":
            net = getattr(model, "net", model)
            linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise UserError("the model has no Linear layer: name a layer with --phi")
            layer, inputs = linears[-1], True
        else:
            layer, inputs = phi, False
        self._recorder = Recorder(model, layer, reduce=None, inputs=inputs, keep_graph=True)
        self._recorder.open()

    @property
    def value(self) -> torch.Tensor | None:
        if self._recorder is None:
            return None
        return next(iter(self._recorder.responses.values()), None)

    def features(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.phi == "logits" else self.value

    def close(self) -> None:
        if self._recorder is not None:
            self._recorder.close()


def adv_step(model, tap: FeatureTap, x, y, eps, cfg: AdvTrainConfig):
    """Loss of one batch (model in training mode); returns ``(loss, logits_clean, x_adv)``.

    Two forward passes; the FGSM gradient reuses the clean forward's graph.
    """
    x = x.detach().requires_grad_(True)
    logits_clean = model(x)
    feat_clean = tap.features(logits_clean) if cfg.beta else None
    ce_clean = F.cross_entropy(logits_clean, y, reduction="sum")
    (grad,) = torch.autograd.grad(ce_clean, x, retain_graph=True)
    x_adv = fgsm_step(x.detach(), grad, eps)
    logits_adv = model(x_adv)
    feat_adv = tap.features(logits_adv) if cfg.beta else None
    loss = consistency_loss(
        logits_clean, logits_adv, feat_clean, feat_adv, y, cfg.alpha, cfg.beta, cfg.consistency
    )
    return loss, logits_clean, x_adv


def sharded_step(net, tap: FeatureTap, cfg: AdvTrainConfig):
    """The ``step`` of :func:`advinterp.train.run_epoch` for this loss.

    ``net`` is the model, or its DDP wrapper. Every process draws the whole
    global batch's ε from the shared generator and keeps its rows, so the draws
    (and the generator's state) are those of one process.
    """

    def step(x, y, gen, rows):
        eps = rows.take(draw_eps(rows.size, cfg.eps_min, cfg.eps_max, gen))
        loss, logits, _ = adv_step(net, tap, x, y, eps.to(x.device), cfg)
        return loss, logits

    return step


def model_name(arch: str, beta: float) -> str:
    return f"{arch}-{'Adv' if beta else 'AT'}"


def advtrain(
    cfg: AdvTrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    *,
    device: str | torch.device | None = None,
    workers: int | None = None,
    amp: bool = False,
):
    """Fine-tune ``cfg.init`` adversarially; write ``out/model.safetensors`` + ``.json`` each epoch.

    ``cfg.init`` is a checkpoint, or an ImageNet model name with ``cfg.weights``
    (the paper fine-tunes a pretrained ImageNet model). ``cfg.data`` is
    Fashion-MNIST or an image folder, augmented and streamed as
    :mod:`advinterp.train` describes; ``device``, ``workers`` and ``amp`` as in
    :func:`advinterp.train.train`. Returns the final ``model.json`` (with per-epoch
    history: clean and FGSM ε=4/255 top-1 on the held-out images, ``None`` without
    any). Started by ``torchrun``, it trains in all the processes (module docstring).
    """
    cfg.check()
    workers = default_workers() if workers is None else workers
    with joined() as world:
        world = on_device(world, device)
        return _advtrain(cfg, Path(out), resume, progress and world.is_main, world, workers, amp)


def _advtrain(cfg, out: Path, resume: bool, progress: bool, world: World, workers: int, amp: bool):
    precision = training_precision(world.device, amp)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.init, cfg.weights)
    init_config = dict(model.config)
    arch = init_config["arch"]
    name = model_name(arch, cfg.beta)
    sync_batch_norm(model, world)  # before the tap, which may hook a batch-norm layer
    if world.device.type == "cpu":
        # Conv weights channels-last like the batches (see attacks.base._channels_last):
        # oneDNN convolves without reordering, a step runs ≈1.3× faster
        # (benches/bench_advtrain.py); the values are the same, sums round differently.
        model.to(memory_format=torch.channels_last)
    tap = FeatureTap(model, cfg.phi)  # an unknown --phi fails before any data is read
    train_set = open_dataset(cfg.data, "train", cfg.data_root, limit=cfg.limit, model=model)
    world.check_batches(len(train_set), cfg.batch_size)
    test_set = _on(world.device, eval_set(cfg, model)) if world.is_main else None
    seed_per_process(cfg.seed, world)
    opt = sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    history, start_epoch, elapsed = [], 0, 0.0
    if resume:
        start_epoch, history, elapsed = train_mod.restore_training(out, cfg, model, opt)
    model.to(world.device)
    for state in opt.state.values():
        state["momentum_buffer"] = state["momentum_buffer"].to(world.device)
    step = sharded_step(world.wrap(model), tap, cfg)  # DDP over several processes
    try:
        for epoch in range(start_epoch, cfg.epochs):
            loss, top1, seconds = train_mod.run_epoch(
                model,
                opt,
                train_set,
                cfg,
                epoch,
                step,
                desc=f"{name} epoch {epoch + 1}/{cfg.epochs}",
                progress=progress,
                world=world,
                workers=workers,
                precision=precision,
            )
            elapsed += seconds
            if world.is_main:
                row = {"clean_top1": None, "fgsm_top1": None}
                if test_set is not None:
                    with precision:
                        row = table2(
                            model,
                            test_set,
                            eps=(4 / 255,),
                            batch_size=min(250, eval_batch_size(test_set, cfg)),
                            workers=workers,
                        )
                history.append(
                    {
                        "epoch": epoch + 1,
                        "train_loss": loss,
                        "train_top1": top1,
                        "test_top1": row["clean_top1"],
                        "test_fgsm4_top1": row["fgsm_top1"],
                        "seconds": elapsed,
                    }
                )
                if progress:
                    held_out = (
                        ""
                        if test_set is None
                        else f", test top-1 {row['clean_top1']:.2f}%, FGSM ε=4 top-1 "
                        f"{row['fgsm_top1']:.2f}%"
                    )
                    tqdm.write(
                        f"{name} epoch {epoch + 1}/{cfg.epochs}: loss {loss:.3f}, train top-1 "
                        f"{top1:.2f}%{held_out}, {elapsed:.0f}s"
                    )
                _save(out, cfg, model, opt, history, elapsed, arch, name, init_config)
            world.barrier()  # the others read model.json at the end
    finally:
        tap.close()
    return read_json(out / "model.json")


def _on(device: torch.device, data):
    """An in-memory ``data`` with its tensors on ``device`` (the evaluation runs where the
    model is); an image folder (or ``None``) as it is."""
    if device.type == "cpu" or not isinstance(data, TensorImageSet):
        return data
    return TensorImageSet(
        data.images.to(device), data.labels.to(device), data.classes, data.wnids, data.name
    )


def _save(out, cfg, model, opt, history, elapsed, arch, name, init_config) -> None:
    train_mod.save_training(
        out,
        cfg,
        model,
        opt,
        history,
        elapsed,
        arch=arch,
        name=name,
        kind="advtrain",
        init_train=init_config.get("train"),
    )
