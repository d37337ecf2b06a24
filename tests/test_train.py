import pytest
import torch

from advinterp import train as train_mod
from advinterp.errors import UserError
from advinterp.io import read_json, read_state_dict
from advinterp.models import load_model
from advinterp.train import TrainConfig, augment, one_cycle, train


def test_one_cycle_by_hand():
    # 100 steps: 15 warm-up steps up to the peak, then linear decay to zero.
    assert one_cycle(0, 100, 1.0) == pytest.approx(1 / 15)
    assert one_cycle(14, 100, 1.0) == pytest.approx(1.0)
    assert one_cycle(15, 100, 1.0) == pytest.approx(1.0)
    assert one_cycle(60, 100, 1.0) == pytest.approx(40 / 85)
    assert one_cycle(100, 100, 1.0) == 0.0


def test_augment_is_a_shift_or_flip_of_each_image():
    x = torch.zeros(16, 1, 12, 12)
    x[:, :, 3:9, 4:8] = torch.rand(16, 1, 6, 4)
    out = augment(x, 2, True, torch.Generator().manual_seed(0))
    seen = set()
    for i in range(16):
        matches = [
            (f, dy, dx)
            for f in (False, True)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(out[i], torch.roll((x[i].flip(2) if f else x[i]), (dy, dx), dims=(1, 2)))
        ]
        assert matches, f"image {i} is not a shifted/flipped copy"
        seen.add(matches[0])
    assert len(seen) > 3  # and the choice varies


def test_training_learns_and_writes_a_checkpoint(small_run):
    config = read_json(small_run / "model.json")
    assert [h["epoch"] for h in config["history"]] == [1, 2]
    assert config["test_top1"] > 60  # 10 classes: chance is 10%
    model = load_model(str(small_run / "model.safetensors"))
    assert (
        model.config["train"]["momentum"] == 0.9 and model.config["train"]["weight_decay"] == 5e-5
    )


def test_resume_after_a_crash_gives_the_same_model(tmp_path, monkeypatch):
    cfg = TrainConfig(epochs=2, limit=600, batch_size=100, eval_limit=200)
    train(cfg, tmp_path / "straight", progress=False)

    real_save = train_mod.save_training

    def crash_after_first_epoch(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_training", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "crashed", progress=False)
    monkeypatch.setattr(train_mod, "save_training", real_save)
    assert read_json(tmp_path / "crashed" / "model.json")["history"][-1]["epoch"] == 1
    train(cfg, tmp_path / "crashed", resume=True, progress=False)

    a = read_state_dict(tmp_path / "straight" / "model.safetensors")
    b = read_state_dict(tmp_path / "crashed" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_resume_with_other_settings_is_refused(small_run):
    with pytest.raises(UserError, match="other settings"):
        train(
            TrainConfig(epochs=3, limit=5000, batch_size=64, eval_limit=1000),
            small_run,
            resume=True,
            progress=False,
        )


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(UserError):
        train(TrainConfig(lr=-1), tmp_path, progress=False)
    with pytest.raises(UserError, match="unknown architecture"):
        train(TrainConfig(arch="lenet", limit=10), tmp_path, progress=False)
