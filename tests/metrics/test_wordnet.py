"""Real WordNet 3.0 (Debian's files) read through NLTK; nothing is downloaded."""

import gzip
import itertools
import math
import random
import re
import time
from pathlib import Path

import pytest
import torch

from advinterp.data.fashion import CLASSES
from advinterp.errors import UserError
from advinterp.metrics import wordnet as W
from advinterp.models.imagenet import imagenet_wnids

FASHION = {name: wnid for name, wnid in CLASSES}


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """A fresh cache, so the WordNet copy and the distance cache are built here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADVINTERP_CACHE", str(tmp_path_factory.mktemp("advinterp-cache")))
        mp.delenv("ADVINTERP_WORDNET", raising=False)
        yield


@pytest.fixture(scope="module")
def load_seconds(private_cache):
    t = time.perf_counter()
    W.wordnet()
    return time.perf_counter() - t


def test_lexnames_is_the_standard_wordnet_30_list():
    lines = W.LEXNAMES_TEXT.splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[6] == "06\tnoun.artifact\t1"
    assert lines[29] == "29\tverb.body\t2" and lines[44] == "44\tadj.ppl\t3"
    man = Path("/usr/share/man/man5/lexnames.5WN.gz")  # Debian's copy of lexnames(5WN)
    if man.is_file():
        table = re.findall(r"^(\d\d)\t(\S+) *\t", gzip.open(man, "rt").read(), re.M)
        assert [f"{n}\t{name}" for n, name in table] == [line.rsplit("\t", 1)[0] for line in lines]


def test_reader_is_wordnet_30_from_a_private_copy(load_seconds, tmp_path):
    root = W.wordnet_root()
    assert (root / "lexnames").read_text() == W.LEXNAMES_TEXT
    assert root.is_relative_to(W.cache_dir())
    assert W.wordnet().get_version() == "3.0"
    assert W.synset_of("n02123045").name() == "tabby.n.01"  # ImageNet class 281
    print(f"\nWordNet reader loaded in {load_seconds:.1f} s")


def test_fashion_distances_match_nltk_and_hand_known_cases():
    wnids = [wnid for _, wnid in CLASSES]
    D = W.class_distance_matrix(wnids, cache=False)
    synsets = [W.synset_of(w) for w in wnids]
    for i, j in itertools.product(range(10), repeat=2):
        assert D[i, j].item() == synsets[i].shortest_path_distance(synsets[j])
    sandal, sneaker = W.synset_of(FASHION["Sandal"]), W.synset_of(FASHION["Sneaker"])
    # Both are shoes (shoe → footwear): one step up from each, d = 2.
    assert [s.name() for s in sandal.lowest_common_hypernyms(sneaker)] == ["shoe.n.01"]
    names = [n for n, _ in CLASSES]
    assert D[names.index("Sandal"), names.index("Sneaker")].item() == 2
    # A jersey (T-shirt) is a kind of shirt: d = 1.
    assert D[names.index("T-shirt/top"), names.index("Shirt")].item() == 1
    C = W.similarity_matrix(wnids, cache=False)
    assert C[names.index("Sandal"), names.index("Sneaker")].item() == pytest.approx(math.exp(-2))
    assert torch.equal(C.diagonal(), torch.ones(10, dtype=torch.float64))
    # A shoe is closer to a shoe than to a bag.
    assert C[names.index("Sandal"), names.index("Sneaker")] > C[names.index("Sandal"), 8]


def test_fast_distances_equal_nltk_pairwise_on_imagenet_sample():
    sample = random.Random(0).sample(imagenet_wnids(), 40)
    D = W.class_distance_matrix(sample, cache=False)
    synsets = [W.synset_of(w) for w in sample]
    want = torch.tensor(
        [[float(a.shortest_path_distance(b)) for b in synsets] for a in synsets],
        dtype=torch.float64,
    )
    assert torch.equal(D, want)


def test_imagenet_similarity_builds_in_seconds_and_is_cached(load_seconds):
    wnids = imagenet_wnids()
    t = time.perf_counter()
    C = W.similarity_matrix(wnids)  # computes and writes the cache
    build = time.perf_counter() - t
    t = time.perf_counter()
    again = W.similarity_matrix(wnids)
    cached = time.perf_counter() - t
    print(
        f"\nImageNet 1000×1000 C: {build:.2f} s to build (+ {load_seconds:.1f} s WordNet load), "
        f"{cached:.3f} s from cache"
    )
    assert build + load_seconds < 20
    assert C.shape == (1000, 1000) and torch.equal(C, again)
    assert torch.equal(C, C.T) and torch.equal(C.diagonal(), torch.ones(1000, dtype=torch.float64))
    # tabby (281) and tiger cat (282) are both domestic cats: d = 2.
    assert C[281, 282].item() == pytest.approx(math.exp(-2))
    # Another σ reuses the cached distances.
    assert W.similarity_matrix(wnids, sigma=2.0)[281, 282].item() == pytest.approx(math.exp(-0.5))


def test_corrupt_cache_is_recomputed():
    wnids = [FASHION["Sandal"], FASHION["Sneaker"]]
    first = W.class_distance_matrix(wnids)
    path = W._cache_file(wnids)
    path.write_bytes(b"not a safetensors file")
    assert torch.equal(W.class_distance_matrix(wnids), first)


def test_unknown_or_malformed_ids_are_user_errors():
    with pytest.raises(UserError, match="n01234567"):
        W.synset_of("n01234567")  # no synset at that offset
    with pytest.raises(UserError, match="'cat' is not a WordNet id"):
        W.synset_of("cat")
    with pytest.raises(UserError, match="n01234567"):
        W.class_distance_matrix(["n02123045", "n01234567"], cache=False)
    assert W.synset_of("sandal.n.01") == W.synset_of(FASHION["Sandal"])


def test_missing_wordnet_files_name_the_debian_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVINTERP_WORDNET", str(tmp_path))
    with pytest.raises(UserError, match="apt-get install wordnet-base wordnet-sense-index"):
        W.wordnet_root()


def test_read_synset_file(tmp_path):
    good = tmp_path / "classes.txt"
    good.write_text(
        "# my classes\ntabby cat\tn02123045\nsandal   n04133789\n\nankle boot n02872752\n"
    )
    assert W.read_synset_file(good) == [
        ("tabby cat", "n02123045"),
        ("sandal", "n04133789"),
        ("ankle boot", "n02872752"),
    ]
    missing = tmp_path / "missing.txt"
    missing.write_text("tabby cat\tn02123045\nunicorn\n")
    with pytest.raises(UserError, match=r"missing.txt:2: class 'unicorn' has no synset"):
        W.read_synset_file(missing)
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("tabby cat\tn02123045\nunicorn\tn01234567\n")
    with pytest.raises(UserError, match=r"class 'unicorn' has no WordNet 3.0 synset 'n01234567'"):
        W.read_synset_file(unknown)
    with pytest.raises(UserError, match="not found"):
        W.read_synset_file(tmp_path / "nope.txt")
