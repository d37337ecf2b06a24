"""Real images paired with their adversarial counterparts, and one recording pass over both.

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

:func:`paired_pass` records the units of the real and the adversarial images of
each batch of positions once and feeds every top-k store that the analyses ask
for (semantics' top 1%, the galleries' top 8, the successful images' own top
1%). It runs through :class:`~advinterp.tally.Tally`: under ``torchrun
--nproc-per-node N`` each process records its share of the batches and the
stores are merged (bit for bit the one-process stores), and with a ``partial``
file a killed pass resumes from its last finished chunk.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from advinterp.attacks.advset import AdversarialSet
from advinterp.attacks.base import attack_succeeded
from advinterp.data import TensorImageSet, open_dataset
from advinterp.device import model_device
from advinterp.distributed import World
from advinterp.errors import UserError
from advinterp.progress import progress as tqdm
from advinterp.record import Recorder, resolve_layers
from advinterp.stats import TopK
from advinterp.tally import Tally, numbered_batches, weights_fingerprint

__all__ = [
    "PairedSets",
    "Store",
    "open_paired_sets",
    "pair_sets",
    "paired_pass",
    "top_pass",
    "unit_counts",
]

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
        self, batch_size: int, numbers: Iterable[int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(images, true labels, positions)`` batches of the real images: all of them, or
        the batches ``numbers`` (ascending; batch ``i`` holds positions ``i·B … (i+1)·B − 1``)."""
        if numbers is None:
            numbers = range(math.ceil(len(self) / batch_size))
        return numbered_batches(self.real, batch_size, numbers, self.workers, self.pin_memory)

    def adversarial_batches(
        self, batch_size: int, numbers: Iterable[int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(images, true labels, positions)`` batches of the adversarial set, read from
        its shards one batch at a time: all of them, or the batches ``numbers`` (ascending)."""
        wanted = None if numbers is None else set(numbers)
        if wanted is not None and not wanted:
            return
        last = None if wanted is None else max(wanted)
        # The shards are memory-mapped: a batch passed over is never read.
        for i, (images, pos) in enumerate(self.adversarial.batches(batch_size)):
            if wanted is None or i in wanted:
                yield images, self.labels[pos], pos
            if last is not None and i >= last:
                return

    def batches(
        self, images: str, batch_size: int, numbers: Iterable[int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """:meth:`real_batches` (``images="real"``) or :meth:`adversarial_batches`."""
        if images == "real":
            return self.real_batches(batch_size, numbers)
        if images == "adversarial":
            return self.adversarial_batches(batch_size, numbers)
        raise ValueError(f"images are 'real' or 'adversarial', not {images!r}")

    def fingerprint(self) -> str:
        """A short hash of the set's attack.json and per-image classes and indices: which
        pairs a checkpoint of a pass over them was made from."""
        h = hashlib.sha256(json.dumps(self.meta, sort_keys=True, default=str).encode())
        for t in (self.indices, self.labels, self.targets, self.preds, self.clean_preds):
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        h.update(str(getattr(self.real, "name", None)).encode())
        return h.hexdigest()[:16]

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


class _Fold:
    """Responses of several layers folded into top-k stores over their concatenated units.

    Rows are kept until ``flush_rows`` images have come and then folded into each
    store at once, rather than per layer and batch: with small batches (which keep a
    CPU's caches warm) the per-call cost of ``topk`` would otherwise rival the
    forward pass. ``allowed`` (per store, a boolean tensor over image positions, or
    None for all) picks the images a store takes.
    """

    def __init__(
        self,
        tops: Mapping[str, TopK],
        allowed: Mapping[str, torch.Tensor | None],
        flush_rows: int,
    ):
        self.tops = tops
        self.allowed = dict(allowed)
        self.flush_rows = flush_rows
        self.pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in tops}
        self.rows = dict.fromkeys(tops, 0)

    def add(self, responses: Mapping[str, torch.Tensor], pos) -> None:
        joined = torch.cat(list(responses.values()), dim=1)
        pos = torch.as_tensor(pos).to(joined.device, non_blocking=True)
        for name in self.tops:
            allowed = self.allowed[name]
            if allowed is None:
                self.pending[name].append((joined, pos))
            else:
                if allowed.device != joined.device:
                    allowed = self.allowed[name] = allowed.to(joined.device)
                keep = allowed[pos]
                self.pending[name].append((joined[keep], pos[keep]))
            self.rows[name] += len(self.pending[name][-1][1])
            if self.rows[name] >= self.flush_rows:
                self._flush(name)

    def _flush(self, name: str) -> None:
        if self.pending[name]:
            values, pos = zip(*self.pending[name], strict=True)
            self.tops[name].add(torch.cat(values), torch.cat(pos))
            self.pending[name].clear()
            self.rows[name] = 0

    def flush(self) -> None:
        for name in self.tops:
            self._flush(name)


def _split_layers(top: TopK, sizes: Mapping[str, int]) -> dict[str, TopK]:
    """A store over concatenated units cut back into one store per layer, on the CPU."""
    values, indices = (t.cpu() for t in top.result())
    parts, start = {}, 0
    for layer, size in sizes.items():
        part = TopK(top.k, size)
        part.set_state_dict(
            {
                "values": values[start : start + size],
                "indices": indices[start : start + size],
                "count": torch.tensor(top.count),
            }
        )
        parts[layer] = part
        start += size
    return parts


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
    """One pass over ``batches`` of one image set feeding several top-k stores per layer.

    ``stores`` maps a name to ``(k, allowed)``: ``allowed`` is ``None`` (every
    image) or a boolean tensor over image positions (only those images enter that
    store, e.g. the successful adversarial images). ``batches`` yields tuples whose
    first item is the images and last their positions. Returns
    ``{store: {layer: TopK}}``, the same as feeding every batch to one
    :class:`~advinterp.stats.TopK` per layer; the forward pass runs once whatever
    the number of stores. The stores fill on the model's device and are returned
    on the CPU. For the real and adversarial images of a paired set together,
    sharded over processes and resumable, see :func:`paired_pass`.
    """
    fold, sizes = None, {}
    model.eval()
    with Recorder(model, layers, reduce=reduce) as rec, torch.inference_mode():
        for item in tqdm(
            batches, total=total, desc=desc, unit="batch", disable=not progress, leave=False
        ):
            responses = rec(item[0])
            if fold is None:
                sizes = {layer: resp.shape[1] for layer, resp in responses.items()}
                tops = {name: TopK(k, sum(sizes.values())) for name, (k, _) in stores.items()}
                allowed = {name: a for name, (_, a) in stores.items()}
                fold = _Fold(tops, allowed, flush_rows)
            fold.add(responses, item[-1])
    if fold is None:
        return {name: {} for name in stores}
    fold.flush()
    return {name: _split_layers(top, sizes) for name, top in fold.tops.items()}


@dataclass(frozen=True)
class Store:
    """A top-k store of :func:`paired_pass`: the ``k`` strongest ``images`` (``"real"`` or
    ``"adversarial"``) of every unit, among the positions ``allowed`` (boolean over
    positions; None: all)."""

    images: str
    k: int
    allowed: torch.Tensor | None = None

    def fingerprint(self) -> list:
        mask = None
        if self.allowed is not None:
            bits = self.allowed.to(torch.bool).cpu().contiguous().numpy().tobytes()
            mask = hashlib.sha256(bits).hexdigest()[:16]
        return [self.images, self.k, mask]


def unit_counts(model, layers: Sequence[str], x: torch.Tensor, reduce: str = "max") -> dict:
    """Units per recorded layer, from one forward pass (stopped after the last layer)."""
    with Recorder(model, layers, reduce=reduce, stop=True) as rec, torch.inference_mode():
        return {layer: resp.shape[1] for layer, resp in rec(x).items()}


def paired_pass(
    model,
    pairs: PairedSets,
    layers: str | Sequence[str],
    stores: Mapping[str, Store],
    *,
    reduce: str = "max",
    batch_size: int = 128,
    world: World | None = None,
    partial: str | Path | None = None,
    chunk: int | None = None,
    progress: bool = False,
    desc: str = "real + adversarial images",
    flush_rows: int = 2048,
) -> dict[str, dict[str, TopK]]:
    """One pass over the real and adversarial images of ``pairs`` feeding every top-k store.

    Each batch of positions is read once from each set and recorded once
    (``layers``: names, ``"units"`` or ``"conv"`` as :func:`~advinterp.record.resolve_layers`
    takes them; the forward stops after the last of them);
    its responses go into every store of ``stores`` (name → :class:`Store`) of
    that set. Returns ``{store: {layer: TopK}}`` on the CPU, the same on every
    process: what :func:`top_pass` gives over each set.

    Args:
        world: the processes (:func:`advinterp.distributed.joined`); each records
            its share of the batches of every chunk (:class:`~advinterp.tally.Tally`) and the stores
            are merged after each chunk, equal bit for bit to one process's (ties
            go to the smaller position, :class:`~advinterp.stats.TopK`).
        partial: a file to checkpoint the stores into after every chunk of
            ``chunk`` images (default :data:`~advinterp.tally.CHUNK_IMAGES`); the same
            pass run again resumes after the last finished chunk (or, finished, only
            reads the file). The caller removes it once the outputs are written.

    Example::

        tops = paired_pass(model, pairs, "units", {"real": Store("real", 100),
                                                  "adversarial": Store("adversarial", 100)})
        values, positions = tops["real"]["layer3.0"].result()   # 64×100 each
    """
    world = world or World()
    layers = resolve_layers(model, layers)
    model.eval()
    sizes = unit_counts(model, layers, pairs.adversarial_images([0]), reduce)
    units = sum(sizes.values())

    def make() -> dict[str, TopK]:
        return {name: TopK(store.k, units) for name, store in stores.items()}

    fingerprint = {
        "pass": "paired top-k",
        "model": weights_fingerprint(model),
        "pairs": pairs.fingerprint(),
        "layers": layers,
        "reduce": reduce,
        "stores": {name: store.fingerprint() for name, store in stores.items()},
    }
    tally = Tally(
        make,
        len(pairs),
        batch_size,
        chunk=chunk,
        world=world,
        partial=partial,
        fingerprint=fingerprint,
        progress=progress,
        desc=desc,
    )
    kinds = [
        kind for kind in ("real", "adversarial") if any(s.images == kind for s in stores.values())
    ]
    bar = tqdm(
        total=len(kinds) * tally.remaining(),
        desc=desc,
        unit="batch",
        disable=not (progress and world.is_main),
        leave=False,
    )
    with Recorder(model, layers, reduce=reduce, stop=True) as rec, torch.inference_mode():
        for numbers in tally.chunks():
            fresh = make()
            for kind in kinds:
                mine = {n: s for n, s in stores.items() if s.images == kind}
                fold = _Fold(
                    {n: fresh[n] for n in mine}, {n: s.allowed for n, s in mine.items()}, flush_rows
                )
                for x, _, pos in pairs.batches(kind, batch_size, numbers):
                    fold.add(rec(x), pos)
                    bar.update()
                fold.flush()
            tally.commit(fresh)
    bar.close()
    return {name: _split_layers(top, sizes) for name, top in tally.stats.items()}
