"""The pass driver: chunks over processes, merging, checkpoints and resuming."""

import pytest
import torch

from advinterp.distributed import World
from advinterp.stats import Quantile, TopK
from advinterp.stats.counts import Counts
from advinterp.tally import Tally, numbered_batches

from .ddp import on_two_processes

N, UNITS, BATCH, CHUNK, K = 1000, 6, 32, 160, 25  # 32 batches, chunks of 5, the last of 2

# Responses rounded to 0.1: many ties inside every top-k, and fine enough for quantiles.
DATA = torch.randn(N, UNITS, generator=torch.Generator().manual_seed(0)).round(decimals=1)


class Killed(Exception):
    pass


def make():
    return {
        "top": TopK(K, UNITS),
        "above": Counts(UNITS),
        "q": Quantile(UNITS, resolution=64, seed=0),
    }


def run(world=None, partial=None, kill_at=None, fingerprint=None):
    """Feed DATA through a Tally; ``kill_at``: raise after that many batches of this run."""
    tally = Tally(
        make,
        N,
        BATCH,
        chunk=CHUNK,
        world=world,
        partial=partial,
        fingerprint=fingerprint or {"data": "randn/0"},
    )
    ran = []
    for numbers in tally.chunks():
        fresh = make()
        for i in numbers:
            if kill_at is not None and len(ran) == kill_at:
                raise Killed
            start, stop = tally.span(i)
            values = DATA[start:stop]
            fresh["top"].add(values, torch.arange(start, stop))
            fresh["above"].add((values > 0.5).sum(0), stop - start)
            fresh["q"].add(values)
            ran.append(i)
        tally.commit(fresh)
    return tally, ran


def exact(tally) -> dict:
    top, above = tally.stats["top"], tally.stats["above"]
    return {
        "values": top.values,
        "indices": top.indices,
        "count": top.count,
        "above": above.counts,
        "n": above.count,
    }


def test_chunks_give_every_batch_to_one_process():
    for n, batch, chunk, size in (
        (1000, 32, 160, 1),
        (1000, 32, 160, 3),
        (5, 2, 4, 4),
        (64, 8, 8, 2),
    ):
        tallies = [
            Tally(make, n, batch, chunk=chunk, world=World(rank=r, size=size)) for r in range(size)
        ]
        per_rank = [list(t.chunks()) for t in tallies]
        for c in range(tallies[0].n_chunks):
            got = sorted(i for chunks in per_rank for i in chunks[c])
            first = c * tallies[0].chunk_batches
            assert got == list(range(first, min(first + tallies[0].chunk_batches, -(-n // batch))))
        assert sum(t.remaining() for t in tallies) == -(-n // batch)
        assert tallies[0].span(-(-n // batch) - 1)[1] == n


def test_the_merged_statistics_are_those_of_the_stream():
    tally, ran = run()
    assert ran == list(range(32))
    want = TopK(K, UNITS)
    want.add(DATA.flip(0), torch.arange(N).flip(0))  # one batch, in the other order
    assert torch.equal(tally.stats["top"].values, want.values)
    assert torch.equal(tally.stats["top"].indices, want.indices)
    assert torch.equal(tally.stats["above"].counts, (DATA > 0.5).sum(0))
    assert tally.stats["above"].count == tally.stats["q"].count == N


def test_a_killed_pass_resumes_from_its_last_chunk(tmp_path):
    partial = tmp_path / "pass.partial"
    whole, _ = run()
    with pytest.raises(Killed):
        run(partial=partial, kill_at=12)  # chunks 0 and 1 done, chunk 2 two batches in
    resumed, ran = run(partial=partial)
    assert resumed.resumed_images == 2 * CHUNK and ran == list(range(10, 32))
    want, got = exact(whole), exact(resumed)
    for key in want:
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(want[key])), key
    # Finished: a run of the same pass only reads the checkpoint.
    again, ran = run(partial=partial)
    assert ran == [] and again.resumed_images == N
    assert torch.equal(again.stats["top"].indices, whole.stats["top"].indices)
    # Another pass's checkpoint is not resumed: it starts over (and replaces the file).
    other, ran = run(partial=partial, fingerprint={"data": "another"})
    assert other.resumed_images == 0 and ran == list(range(32))


def _quantile_within_rank_error(sketch: Quantile, q: float = 0.9, tol: float = 0.05) -> None:
    got = sketch.quantile(q)
    below = (DATA < got).float().mean(0)
    at_most = (DATA <= got).float().mean(0)
    assert bool((below <= q + tol).all()) and bool((at_most >= q - tol).all()), (below, at_most)


def _two_process_runs(world: World, out: str) -> dict:
    whole, ran = run(world=world)
    resumed, ran_resumed = run(world=world, partial=f"{out}/from-one.partial")
    return {
        "whole": exact(whole),
        "resumed": exact(resumed),
        "q": whole.stats["q"].state_dict(),
        "ran": ran,
        "ran_resumed": ran_resumed,
    }


def test_two_processes_give_the_one_process_statistics(tmp_path):
    """Two gloo processes against one: top-k and counts bit for bit, the quantile sketch
    within its rank error; and a pass killed on one process resumed on two."""
    one, _ = run()
    with pytest.raises(Killed):
        run(partial=tmp_path / "from-one.partial", kill_at=17)  # 3 chunks done
    ranks = on_two_processes(_two_process_runs, tmp_path, str(tmp_path))
    assert sorted(ranks[0]["ran"] + ranks[1]["ran"]) == list(range(32))
    assert sorted(ranks[0]["ran_resumed"] + ranks[1]["ran_resumed"]) == list(range(15, 32))
    for r in ranks:
        for run_ in ("whole", "resumed"):
            for key, want in exact(one).items():
                assert torch.equal(torch.as_tensor(r[run_][key]), torch.as_tensor(want)), key
    sketch = Quantile(UNITS, resolution=64)
    sketch.set_state_dict(ranks[0]["q"])
    assert sketch.count == N
    _quantile_within_rank_error(sketch)
    _quantile_within_rank_error(one.stats["q"])


class _Items(torch.utils.data.Dataset):
    """An image-folder-like set: items ``(image, label, index)``, every seventh undecodable."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        image = None if i % 7 == 3 else torch.full((1, 2, 2), float(i))
        return image, i % 5, i


@pytest.mark.filterwarnings("ignore:skipped")
def test_numbered_batches_are_the_batches_of_one_pass():
    from advinterp.data import TensorImageSet, batches

    folder = _Items()
    tensors = TensorImageSet(
        torch.arange(23 * 4, dtype=torch.uint8).view(23, 1, 2, 2), torch.arange(23) % 5, [], []
    )
    for data in (folder, tensors):
        every = list(batches(data, 5))
        for numbers in ([0, 2, 4], [1], [3, 4], []):
            got = list(numbered_batches(data, 5, numbers))
            want = [every[i] for i in numbers]
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                assert all(torch.equal(a, b) for a, b in zip(g, w, strict=True))
