import pytest
import torch

from advinterp.attacks import make_attack
from advinterp.attacks.advset import build_adversarial_set, load_adversarial_set
from advinterp.cli import main
from advinterp.data import open_dataset
from advinterp.errors import UserError
from advinterp.io import read_json
from advinterp.models import load_model

from ..ddp import on_two_processes


def test_attack_verb_writes_exact_images_labels_and_stats(small_run, tmp_path, capsys):
    model_path = str(small_run / "model.safetensors")
    out = tmp_path / "fgsm"
    rc = main(
        [
            "attack",
            "--model",
            model_path,
            "--method",
            "fgsm",
            "--eps",
            "8",
            "--limit",
            "100",
            "--out",
            str(out),
            "--batch-size",
            "32",
        ]
    )
    assert rc == 0 and str(out) in capsys.readouterr().out
    tensors, meta = load_adversarial_set(out)
    model = load_model(model_path)
    data = open_dataset("fashion-mnist", "test", limit=100)
    x, y = data.images.float() / 255, data.labels
    # The same batch size as the CLI call: other batch shapes may round differently.
    expected = make_attack("fgsm", model, eps=8 / 255).run(x, y, batch_size=32, progress=False)
    assert torch.equal(tensors["images"], expected)  # exact floats, as the attack made them
    assert torch.equal(tensors["labels"], y) and torch.equal(tensors["indices"], torch.arange(100))
    assert (tensors["targets"] == -1).all()
    with torch.inference_mode():
        preds = model(expected).argmax(1)
    assert torch.equal(tensors["preds"], preds)
    stats = meta["stats"]
    assert stats["success_rate"] == pytest.approx(float((preds != y).float().mean()))
    assert stats["mean_linf"] <= 8 / 255 + 1e-6
    l2 = (expected - x).flatten(1).norm(dim=1).mean()
    assert stats["mean_l2"] == pytest.approx(float(l2), rel=1e-5)


def test_a_resumed_set_equals_an_uninterrupted_one(small_run, tmp_path):
    model = load_model(str(small_run / "model.safetensors"))
    data = open_dataset("fashion-mnist", "test", limit=90)
    kw = dict(
        method="pgd", eps=8 / 255, targeted=True, target="random", chunk=40, progress=False, steps=3
    )
    build_adversarial_set(model, data, tmp_path / "a", **kw)
    build_adversarial_set(model, data, tmp_path / "b", **kw)
    (tmp_path / "b" / "shards" / "00001.safetensors").unlink()
    (tmp_path / "b" / "attack.json").unlink()
    with pytest.raises(UserError, match="--resume"):
        build_adversarial_set(model, data, tmp_path / "b", **kw)
    build_adversarial_set(model, data, tmp_path / "b", resume=True, **kw)
    a, meta_a = load_adversarial_set(tmp_path / "a")
    b, meta_b = load_adversarial_set(tmp_path / "b")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert meta_a["stats"] == meta_b["stats"] and meta_a["shards"] == 3
    assert (a["targets"] != a["labels"]).all()  # random targets are never the true class
    with pytest.raises(UserError, match="other settings"):
        build_adversarial_set(model, data, tmp_path / "b", resume=True, **{**kw, "seed": 5})


class _Counting(torch.utils.data.Dataset):
    """An image-folder-like set (items decoded one by one) that records which it read."""

    def __init__(self, data):
        self.data, self.name, self.read = data, data.name, []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        self.read.append(i)
        return self.data.images[i].float() / 255, int(self.data.labels[i]), i


def test_a_resumed_set_reads_only_its_unfinished_chunks(small_run, tmp_path):
    model = load_model(str(small_run / "model.safetensors"))
    data = open_dataset("fashion-mnist", "test", limit=90)
    kw = dict(method="fgsm", eps=8 / 255, chunk=40, progress=False)
    build_adversarial_set(model, data, tmp_path / "a", **kw)
    (tmp_path / "a" / "shards" / "00001.safetensors").unlink()
    (tmp_path / "a" / "attack.json").unlink()
    items = _Counting(data)
    build_adversarial_set(model, items, tmp_path / "a", resume=True, **kw)
    assert items.read == list(range(40, 80))  # chunk 1 alone, decoded once
    build_adversarial_set(model, data, tmp_path / "b", **kw)
    a, _ = load_adversarial_set(tmp_path / "a")
    b, _ = load_adversarial_set(tmp_path / "b")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_an_incomplete_set_is_a_clear_error(small_run, tmp_path):
    model = load_model(str(small_run / "model.safetensors"))
    data = open_dataset("fashion-mnist", "test", limit=20)
    build_adversarial_set(
        model,
        data,
        tmp_path / "s",
        method="fgsm",
        eps=4 / 255,
        targeted=False,
        chunk=10,
        progress=False,
    )
    (tmp_path / "s" / "shards" / "00000.safetensors").unlink()
    with pytest.raises(UserError, match="incomplete"):
        load_adversarial_set(tmp_path / "s")
    assert read_json(tmp_path / "s" / "attack.json")["shards"] == 2


def _attack_worker(world, model_path: str, out: str) -> list[int]:
    """The chunks' seeds this process attacked with, building the set into ``out``."""
    import advinterp.attacks

    made = []
    make = advinterp.attacks.make_attack

    def counting(*args, **kwargs):
        made.append(kwargs["seed"])
        return make(*args, **kwargs)

    advinterp.attacks.make_attack = counting  # build_adversarial_set imports it when called
    model = load_model(model_path)
    data = open_dataset("fashion-mnist", "test", limit=64)
    build_adversarial_set(model, data, out, **SHARDED)
    return made


# Four chunks (16, 16, 16, 16 images): processes 0 and 1 attack two each; random targets and
# opt's seeded start depend on the chunk's seed, so a wrong chunk-to-seed pairing shows.
SHARDED = dict(
    method="opt", target="random", steps=3, chunk=16, batch_size=8, seed=3, progress=False
)


def test_two_processes_write_the_set_of_one(small_run, tmp_path):
    model_path = str(small_run / "model.safetensors")
    seeds = on_two_processes(_attack_worker, tmp_path, model_path, str(tmp_path / "two"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same kernels, the same rounding
    try:
        model = load_model(model_path)
        data = open_dataset("fashion-mnist", "test", limit=64)
        build_adversarial_set(model, data, tmp_path / "one", **SHARDED)
    finally:
        torch.set_num_threads(threads)
    one, meta_one = load_adversarial_set(tmp_path / "one")
    two, meta_two = load_adversarial_set(tmp_path / "two")
    for key in one:
        assert torch.equal(one[key], two[key]), key
    assert meta_one == meta_two and meta_two["shards"] == 4
    assert read_json(tmp_path / "two" / "settings.json") == read_json(
        tmp_path / "one" / "settings.json"
    )
    assert seeds == [[3, 5], [4, 6]]  # chunks 0, 2 and 1, 3: seed 3 + chunk
    shards = sorted(p.name for p in (tmp_path / "two" / "shards").iterdir())
    assert shards == [f"{i:05d}.safetensors" for i in range(4)]
