"""Real images paired with their adversarial counterparts, and one recording pass over either.

An adversarial set from ``advinterp attack`` holds, for each of its ``M``
images, the index of the clean image it was made from. The analysis indexes
both sets by *position* ``p`` in the adversarial set: real image ``p`` is
``dataset[indices[p]]``, adversarial image ``p`` is image ``p`` of the set, so
the real and adversarial sets have the same size and the same true classes, as
in the paper (§2, §4.2: the validation set and its adversarial counterpart).
Both are streamed batch by batch: the real images from their dataset, the
adversarial ones from the set's shards (:class:`~advinterp.attacks.advset.AdversarialSet`),
so no pass holds more than a batch of either.

:func:`open_paired_sets` checks that the set fits the model and the dataset
(same labels, same image size, same clean predictions) before any long pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from advinterp.attacks.advset import AdversarialSet
from advinterp.attacks.base import attack_succeeded
from advinterp.data import TensorImageSet, batches, open_dataset
from advinterp.device import model_device
from advinterp.errors import UserError
from advinterp.progress import progress as tqdm
from advinterp.record import Recorder
from advinterp.stats import TopK

__all__ = ["PairedSets", "open_paired_sets", "pair_sets", "top_pass"]

# Share of clean predictions that may differ from the ones stored with the set
# (float summation order differs between batch sizes and machines).
_PREDICTION_TOLERANCE = 0.01
_CHECK_IMAGES = 500
_CHECK_BATCH = 50  # images per forward pass of the check: 500 at 224² would take gigabytes


class _Positions(torch.utils.data.Dataset):
    """Items ``(x, label, p)`` of ``dataset[indices[p]]``: a dataset seen by position."""

    def __init__(self, dataset, indices: torch.Tensor):
        self.dataset = dataset
        self.indices = indices
        self.name = getattr(dataset, "name", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, p: int):
        x, y, _ = self.dataset[int(self.indices[p])]
        return x, y, p


@dataclass
class PairedSets:
    """A real image set and its adversarial counterpart, both indexed by position.

    ``real`` yields ``(x, label, p)`` items (use :func:`advinterp.data.batches`);
    ``adversarial`` is the set, its images on disk (or in memory, for a set built
    with :meth:`AdversarialSet.from_tensors`). ``labels``, ``targets``, ``preds``,
    ``clean_preds``, ``indices`` and ``meta`` (its ``attack.json``) are the set's.
    ``workers`` and ``pin_memory`` go to the real images' loader (image folders).
    """

    real: torch.utils.data.Dataset
    adversarial: AdversarialSet
    workers: int = 0
    pin_memory: bool = False

    def __len__(self) -> int:
        return len(self.adversarial)

    @property
    def labels(self) -> torch.Tensor:
        return self.adversarial.labels

    @property
    def targets(self) -> torch.Tensor:
        return self.adversarial.targets

    @property
    def preds(self) -> torch.Tensor:
        return self.adversarial.preds

    @property
    def clean_preds(self) -> torch.Tensor:
        return self.adversarial.clean_preds

    @property
    def indices(self) -> torch.Tensor:
        return self.adversarial.indices

    @property
    def meta(self) -> dict:
        return self.adversarial.meta

    @property
    def success(self) -> torch.Tensor:
        """Per image: the attack reached its target (targeted) or changed the true label (not)."""
        return attack_succeeded(self.preds, self.labels, self.targets)

    @property
    def attack_classes(self) -> torch.Tensor:
        """The class the attack drove each image to, q̃'s source (eq. 13): its target, or,
        for an untargeted image, the model's prediction on it."""
        return torch.where(self.targets >= 0, self.targets, self.preds)

    def attack_stats(self) -> dict:
        """Method, success rate, mean L2 and L∞ (from ``attack.json`` where present), counts."""
        stats = dict(self.meta.get("stats") or {})
        success = self.success
        return {
            "method": self.meta.get("method"),
            "success_rate": stats.get("success_rate", float(success.float().mean())),
            "mean_l2": stats.get("mean_l2"),
            "mean_linf": stats.get("mean_linf"),
            "n": len(self),
            "n_successful": int(success.sum()),
        }

    def real_batches(
        self, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(images, true labels, positions)`` batches of the real images."""
        return batches(self.real, batch_size, workers=self.workers, pin_memory=self.pin_memory)

    def adversarial_batches(
        self, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(images, true labels, positions)`` batches of the adversarial set, read from
        its shards one batch at a time."""
        for images, pos in self.adversarial.batches(batch_size):
            yield images, self.labels[pos], pos

    def real_images(self, positions: Sequence[int]) -> torch.Tensor:
        """The real images at ``positions``, stacked (for galleries)."""
        return torch.stack([self.real[int(p)][0] for p in positions])

    def adversarial_images(self, positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The adversarial images at ``positions``, stacked (for galleries)."""
        return self.adversarial.images_at(positions)


def _dataset_spec(name: str | None) -> tuple[str, str]:
    # attack.json names its dataset as ``open_dataset`` does: "fashion-mnist/test",
    # "imagefolder:PATH".
    if not name:
        raise UserError("the adversarial set does not name its dataset: pass --data (and --split)")
    if name.startswith("imagefolder:"):
        return name, "test"
    spec, _, split = name.partition("/")
    return spec, split or "test"


def open_paired_sets(
    model,
    adversarial: str | Path,
    data: str | None = None,
    split: str | None = None,
    data_root: str | None = None,
    workers: int = 0,
) -> PairedSets:
    """Open the adversarial set in folder ``adversarial`` and pair it with its real images.

    The real images come from the dataset the set names in ``attack.json``
    (``data``/``split``/``data_root`` override it); an image folder is decoded by
    ``workers`` processes, into page-locked memory when the model is on a GPU.
    The adversarial images stay on disk until a pass reads them. Raises
    :class:`UserError` when the folder is missing or incomplete, or the set does
    not fit the model or the dataset.

    Example::

        pairs = open_paired_sets(load_model("runs/resnet"), "runs/resnet-opt")
        len(pairs), pairs.attack_stats()["success_rate"]
    """
    folder = Path(adversarial)
    if not (folder / "attack.json").is_file():
        what = "does not exist" if not folder.exists() else "holds no attack.json"
        raise UserError(
            f"adversarial set {folder} {what}: make one with "
            f"`advinterp attack --model CKPT --method opt --out {folder}`"
        )
    adv = AdversarialSet(folder)
    meta = adv.meta
    if data is not None:
        spec, default_split = data, "test"
    else:
        spec, default_split = _dataset_spec(meta.get("dataset"))
    dataset = open_dataset(spec, split or default_split, data_root, model=model)
    pairs = pair_sets(model, dataset, adv, source=str(folder))
    pairs.workers = workers
    return pairs


def pair_sets(
    model,
    dataset,
    adversarial: AdversarialSet | Mapping[str, torch.Tensor],
    meta: dict | None = None,
    source: str = "the adversarial set",
) -> PairedSets:
    """Pair an adversarial set with the real ``dataset`` it was made from, checking
    indices, labels, image size, class range and the model's clean predictions.

    ``adversarial`` is an :class:`AdversarialSet`, or its tensors (every key of
    :data:`~advinterp.attacks.advset.KEYS`) with ``meta``, its ``attack.json``.
    """
    if not isinstance(adversarial, AdversarialSet):
        adversarial = AdversarialSet.from_tensors(adversarial, meta or {})
    indices, labels = adversarial.indices, adversarial.labels
    n_data = len(dataset)
    if len(indices) == 0:
        raise UserError(f"{source} holds no images; rerun the attack")
    if int(indices.max()) >= n_data or int(indices.min()) < 0:
        raise UserError(
            f"{source} indexes image {int(indices.max())} but {getattr(dataset, 'name', 'the dataset')} "
            f"has {n_data}: it was made from another dataset (pass the right --data/--split)"
        )
    true = _dataset_labels(dataset, indices)
    if true is not None and not torch.equal(true, labels):
        bad = int((true != labels).sum())
        raise UserError(
            f"{source} does not match {getattr(dataset, 'name', 'the dataset')}: {bad} of "
            f"{len(labels)} labels differ; it was made from another dataset (pass --data/--split)"
        )
    num_classes = getattr(model, "num_classes", None)
    for key in ("labels", "targets", "preds", "clean_preds"):
        top = int(getattr(adversarial, key).max())
        if num_classes is not None and top >= num_classes:
            raise UserError(
                f"{source} has {key} up to class {top} but the model has {num_classes} classes: "
                "it was made for another model"
            )
    if isinstance(dataset, TensorImageSet):
        real = TensorImageSet(
            dataset.images[indices],
            dataset.labels[indices],
            dataset.classes,
            dataset.wnids,
            dataset.name,
        )
    else:
        real = _Positions(dataset, indices)
    pairs = PairedSets(
        real=real,
        adversarial=adversarial,
        pin_memory=model_device(model).type == "cuda",
    )
    shape = tuple(adversarial.image_shape)
    model.eval()
    checked = agreed = 0
    for x, _, pos in pairs.real_batches(_CHECK_BATCH):
        if tuple(x.shape[1:]) != shape:
            raise UserError(
                f"{source} holds {'×'.join(map(str, shape))} images but the dataset gives "
                f"{'×'.join(map(str, x.shape[1:]))}: it was made from other data or for another "
                "model"
            )
        with torch.inference_mode():
            preds = model(x).argmax(1).cpu()
        agreed += int((preds == pairs.clean_preds[pos]).sum())
        checked += len(pos)
        if checked >= _CHECK_IMAGES:
            break
    agree = agreed / max(checked, 1)
    if agree < 1 - _PREDICTION_TOLERANCE:
        raise UserError(
            f"{source} was made for another model: its stored clean predictions agree with this "
            f"model's on only {100 * agree:.0f}% of images; attack this model "
            "(advinterp attack --model CKPT --out DIR)"
        )
    return pairs


def _dataset_labels(dataset, indices: torch.Tensor) -> torch.Tensor | None:
    labels = getattr(dataset, "labels", None)
    if torch.is_tensor(labels):
        return labels.to(torch.int64)[indices]
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return torch.tensor([samples[int(i)][1] for i in indices], dtype=torch.int64)
    return None


def top_pass(
    model,
    batches: Iterable,
    layers: str | Sequence[str],
    stores: Mapping[str, tuple[int, torch.Tensor | None]],
    reduce: str = "max",
    progress: bool = False,
    desc: str = "top-k",
    total: int | None = None,
    flush_rows: int = 2048,
) -> dict[str, dict[str, TopK]]:
    """One pass over ``batches`` feeding several top-k stores per recorded layer.

    ``stores`` maps a name to ``(k, allowed)``: ``allowed`` is ``None`` (every
    image) or a boolean tensor over image positions (only those images enter that
    store, e.g. the successful adversarial images). ``batches`` yields tuples whose
    first item is the images and last their positions. Returns
    ``{store: {layer: TopK}}``, the same as feeding every batch to one
    :class:`~advinterp.stats.TopK` per layer; the forward pass runs once whatever
    the number of stores. The stores fill on the model's device (positions and
    ``allowed`` follow the responses there) and are returned on the CPU.

    Responses of all layers are concatenated and folded into one top-k store per
    ``flush_rows`` images rather than per layer and batch: with small batches
    (which keep a CPU's caches warm) the per-call cost of ``topk`` would
    otherwise rival the forward pass.
    """
    sizes: dict[str, int] = {}
    merged: dict[str, TopK] = {}
    allowed_on: dict[str, torch.Tensor | None] = {}
    pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in stores}
    rows = dict.fromkeys(stores, 0)

    def flush(name: str) -> None:
        if pending[name]:
            values, pos = zip(*pending[name], strict=True)
            merged[name].add(torch.cat(values), torch.cat(pos))
            pending[name].clear()
            rows[name] = 0

    model.eval()
    with Recorder(model, layers, reduce=reduce) as rec, torch.inference_mode():
        for item in tqdm(
            batches, total=total, desc=desc, unit="batch", disable=not progress, leave=False
        ):
            x, pos = item[0], item[-1]
            responses = rec(x)
            joined = torch.cat(list(responses.values()), dim=1)
            if not sizes:
                sizes = {layer: resp.shape[1] for layer, resp in responses.items()}
                merged = {name: TopK(k, sum(sizes.values())) for name, (k, _) in stores.items()}
                allowed_on = {
                    name: None if allowed is None else allowed.to(joined.device)
                    for name, (_, allowed) in stores.items()
                }
            pos = torch.as_tensor(pos).to(joined.device, non_blocking=True)
            for name in stores:
                allowed = allowed_on[name]
                if allowed is None:
                    pending[name].append((joined, pos))
                else:
                    keep = allowed[pos]
                    pending[name].append((joined[keep], pos[keep]))
                rows[name] += len(pending[name][-1][1])
                if rows[name] >= flush_rows:
                    flush(name)
    tops: dict[str, dict[str, TopK]] = {}
    for name, top in merged.items():
        flush(name)
        values, indices = (t.cpu() for t in top.result())
        tops[name], start = {}, 0
        for layer, size in sizes.items():
            part = TopK(top.k, size)
            part.set_state_dict(
                {
                    "values": values[start : start + size],
                    "indices": indices[start : start + size],
                    "count": torch.tensor(top.count),
                }
            )
            tops[name][layer] = part
            start += size
    return tops
