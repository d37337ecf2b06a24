"""WordNet 3.0 class distances and the class similarity matrix C of eq. 10.

WordNet comes from Debian's ``wordnet-base`` and ``wordnet-sense-index``
(``/usr/share/wordnet``) and is read through NLTK's own reader; nothing is
downloaded. Debian ships no ``lexnames`` file, which NLTK's reader needs, so
the dictionary files are copied once, with the standard 45-line ``lexnames``,
into ``<cache>/nltk_data/corpora/wordnet`` (the cache is ``$ADVINTERP_CACHE``,
else ``$XDG_CACHE_HOME/advinterp``, else ``~/.cache/advinterp``). A copy rather
than symlinks or hard links because NLTK ≥ 3.10 refuses files that resolve
outside the corpus folder. ``$ADVINTERP_WORDNET`` points at another WordNet 3.0
dictionary folder.

A class is a synset id ``wnid``: ``n02123045`` is the noun at offset 2123045
(ImageNet's ids are WordNet 3.0 noun offsets). The distance between two
classes is the length of the shortest path joining their synsets through a
common hypernym (NLTK's ``Synset.shortest_path_distance``, instance hypernyms
included); eq. 10 turns it into ``c = exp(-d² / 2σ²)``.

Example::

    C = similarity_matrix([wnid for _, wnid in FASHION_CLASSES])   # 10×10, σ = 1
    C[5, 7]          # sandal vs sneaker: both shoes, d = 2, c = exp(-2)
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
import warnings
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from advinterp.errors import UserError
from advinterp.io import atomic_replace, cache_dir

__all__ = [
    "DEBIAN_WORDNET",
    "cache_dir",
    "wordnet_root",
    "wordnet",
    "synset_of",
    "hypernym_depths",
    "class_distance_matrix",
    "similarity_from_distances",
    "similarity_matrix",
    "read_synset_file",
]

DEBIAN_WORDNET = Path("/usr/share/wordnet")
_INSTALL_HINT = (
    "install Debian's WordNet 3.0 (apt-get install wordnet-base wordnet-sense-index) "
    "or set ADVINTERP_WORDNET to a WordNet 3.0 dict folder"
)

# The dictionary files NLTK's WordNetCorpusReader opens (its ``_FILES``, less lexnames).
_DICT_FILES = (
    "cntlist.rev",
    "index.sense",
    "index.adj",
    "index.adv",
    "index.noun",
    "index.verb",
    "data.adj",
    "data.adv",
    "data.noun",
    "data.verb",
    "adj.exc",
    "adv.exc",
    "noun.exc",
    "verb.exc",
)

# WordNet 3.0's lexicographer files, numbered as in lexnames(5WN): file number,
# name, syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb).
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
LEXNAMES_TEXT = "".join(
    f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES)
)

_WNID = re.compile(r"^([nvasr])(\d{8})$")
_SYNSET_NAME = re.compile(r"^.+\.[nvasr]\.\d{2}$")
_CACHE_FORMAT = "wordnet-3.0-shortest-path-v1"


def _source_dir() -> Path:
    return Path(os.environ.get("ADVINTERP_WORDNET") or DEBIAN_WORDNET).expanduser()


def wordnet_root() -> Path:
    """A folder NLTK's WordNet reader accepts: the source itself if it has ``lexnames``,
    else a private copy with ``lexnames`` added (made once, atomically)."""
    src = _source_dir()
    missing = [f for f in _DICT_FILES if not (src / f).is_file()]
    if missing:
        raise UserError(f"WordNet 3.0 not found in {src} (no {missing[0]}): {_INSTALL_HINT}")
    if (src / "lexnames").is_file():
        return src
    dest = cache_dir() / "nltk_data" / "corpora" / "wordnet"
    if _is_copy_of(dest, src):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".wordnet."))
    except OSError as e:
        raise UserError(
            f"cannot write the WordNet copy under {dest.parent} ({e.strerror}): "
            "set ADVINTERP_CACHE to a writable folder"
        ) from None
    try:
        for name in _DICT_FILES:
            shutil.copyfile(src / name, tmp / name)
        (tmp / "lexnames").write_text(LEXNAMES_TEXT)
        if dest.exists() and not _is_copy_of(dest, src):
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _is_copy_of(dest, src):  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _is_copy_of(dest: Path, src: Path) -> bool:
    try:
        if (dest / "lexnames").read_text() != LEXNAMES_TEXT:
            return False
        return all((dest / f).stat().st_size == (src / f).stat().st_size for f in _DICT_FILES)
    except OSError:
        return False


@functools.lru_cache(maxsize=4)
def _reader(root: str):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class WordNet30Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            # NLTK maps OMW's WordNet 3.0 ids onto the loaded version by reading
            # index.sense twice (most of the load time); these files are 3.0.
            return None

    # NLTK ≥ 3.10 opens corpus files only under its data roots.
    if root not in nltk.data.path:
        nltk.data.path.append(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        try:
            reader = WordNet30Reader(root, None)
            version = reader.get_version()
        except (OSError, ValueError, AssertionError) as e:
            raise UserError(f"cannot read WordNet from {root} ({e}): {_INSTALL_HINT}") from None
    if version != "3.0":
        raise UserError(
            f"{root} holds WordNet {version}, but class ids (wnids) are WordNet 3.0 offsets: "
            f"{_INSTALL_HINT}"
        )
    return reader


def wordnet():
    """NLTK's ``WordNetCorpusReader`` over WordNet 3.0 (loaded once per process, ~2–5 s)."""
    return _reader(str(wordnet_root()))


def synset_of(wnid: str):
    """The NLTK synset of ``wnid`` (``n02123045``: noun offset 2123045); an NLTK name
    such as ``tabby.n.01`` is accepted too. Raises :class:`UserError` for an unknown id."""
    return _synset(wordnet(), wnid)


def _synset(wn, wnid: str):
    wnid = str(wnid).strip()
    m = _WNID.match(wnid)
    if m is None and not _SYNSET_NAME.match(wnid):
        raise UserError(
            f"{wnid!r} is not a WordNet id: write a synset id like n02123045 "
            "(pos letter + 8-digit offset) or a name like tabby.n.01"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns and returns None for a bad offset
        try:
            if m is not None:
                synset = wn.synset_from_pos_and_offset(m.group(1), int(m.group(2)))
            else:
                synset = wn.synset(wnid)
        except Exception:  # WordNetError, ValueError, KeyError: an id that does not resolve
            synset = None
    if synset is None:
        raise UserError(f"no WordNet 3.0 synset {wnid!r}: check the class's synset id")
    return synset


def hypernym_depths(synset) -> dict:
    """Every ancestor of ``synset`` (itself included) with its fewest hypernym steps.

    Breadth-first over hypernyms and instance hypernyms, as NLTK's
    ``shortest_path_distance`` does, so the two agree.
    """
    depths = {}
    queue = deque([(synset, 0)])
    while queue:
        s, d = queue.popleft()
        if s in depths:
            continue
        depths[s] = d
        queue.extend((h, d + 1) for h in s.hypernyms() + s.instance_hypernyms())
    return depths


def _distances(wnids: Sequence[str]) -> np.ndarray:
    wn = wordnet()
    maps = [hypernym_depths(_synset(wn, w)) for w in wnids]
    column: dict = {}
    members: list[list[tuple[int, int]]] = []  # per ancestor: (class, depth)
    for i, m in enumerate(maps):
        for s, d in m.items():
            j = column.setdefault(s, len(members))
            if j == len(members):
                members.append([])
            members[j].append((i, d))
    n = len(wnids)
    dist = np.full((n, n), np.inf)
    # d(a, b) = min over common ancestors h of depth_a(h) + depth_b(h): one
    # vectorised block per ancestor, over the classes that share it.
    for pairs in members:
        rows, depth = np.array(pairs, dtype=np.int64).T
        block = np.ix_(rows, rows)
        dist[block] = np.minimum(dist[block], depth[:, None] + depth[None, :])
    return dist


def _cache_file(wnids: Sequence[str]) -> Path:
    key = hashlib.sha256("\n".join([_CACHE_FORMAT, *wnids]).encode()).hexdigest()[:20]
    return cache_dir() / "wordnet" / f"distances-{len(wnids)}-{key}.safetensors"


def _read_cache(path: Path, wnids: Sequence[str]) -> torch.Tensor | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("wnids") != ",".join(wnids):
                return None
            dist = f.get_tensor("distances")
    except Exception:  # missing, truncated or foreign file: recompute
        return None
    return dist if dist.shape == (len(wnids), len(wnids)) else None


def class_distance_matrix(wnids: Sequence[str], cache: bool = True) -> torch.Tensor:
    """``D[l, m]`` = shortest hypernym-path length between the synsets of ``wnids[l]``
    and ``wnids[m]`` (float64; ``inf`` where they share no ancestor, e.g. two verbs).

    Equals NLTK's ``shortest_path_distance`` pairwise, computed from each synset's
    ancestors once: all 1000 ImageNet classes take about a second after WordNet is
    loaded. With ``cache`` the matrix is kept under :func:`cache_dir` (keyed by the
    ids), so a second call does not load WordNet at all.
    """
    wnids = [str(w).strip() for w in wnids]
    if not wnids:
        raise UserError("no classes given: pass at least one WordNet id")
    path = _cache_file(wnids)
    if cache:
        dist = _read_cache(path, wnids)
        if dist is not None:
            return dist
    dist = torch.from_numpy(_distances(wnids))
    if cache:
        from safetensors.torch import save_file

        try:
            atomic_replace(
                path,
                lambda tmp: save_file(
                    {"distances": dist}, tmp, metadata={"wnids": ",".join(wnids)}
                ),
            )
        except OSError:
            pass  # an unwritable cache only costs time
    return dist


def similarity_from_distances(dist: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Eq. 10 on a distance matrix: ``C = exp(-d² / 2σ²)`` (float64; ``d = inf`` gives 0)."""
    if not sigma > 0:
        raise UserError(f"sigma must be positive, got {sigma}")
    dist = torch.as_tensor(dist, dtype=torch.float64)
    return torch.exp(-(dist**2) / (2.0 * sigma**2))


def similarity_matrix(wnids: Sequence[str], sigma: float = 1.0, cache: bool = True) -> torch.Tensor:
    """The class similarity matrix of eq. 10: ``C[l, m] = exp(-d²(w_l, w_m) / 2σ²)``.

    ``d`` is :func:`class_distance_matrix` (cached on disk by the ids, so C follows
    for any σ without WordNet). σ = 1 as in the paper. Returns float64, ones on
    the diagonal, 0 for classes with no common ancestor.

    Example::

        C = similarity_matrix(imagenet_wnids())   # 1000×1000
    """
    if not sigma > 0:
        raise UserError(f"sigma must be positive, got {sigma}")
    return similarity_from_distances(class_distance_matrix(wnids, cache=cache), sigma)


def read_synset_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read a user's class list: one ``class_name<TAB or spaces>wnid`` per line, in class order.

    The name may contain spaces (the id is the last field); blank lines and lines
    starting with ``#`` are skipped. Every id must resolve to a WordNet 3.0 synset.
    Returns ``[(name, wnid), …]``, like ``advinterp.data.fashion.CLASSES``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"synset file {path} not found; check the path")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read synset file {path} ({e})") from None
    classes = []
    wn = None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.rsplit(None, 1)
        if len(fields) < 2 or not (_WNID.match(fields[1]) or _SYNSET_NAME.match(fields[1])):
            raise UserError(
                f"{path}:{number}: class {line!r} has no synset: write 'class_name<TAB>wnid', "
                "e.g. 'tabby cat\tn02123045'"
            )
        name, wnid = fields
        if wn is None:
            wn = wordnet()
        try:
            _synset(wn, wnid)
        except UserError:
            raise UserError(
                f"{path}:{number}: class {name!r} has no WordNet 3.0 synset {wnid!r}; fix its id"
            ) from None
        classes.append((name, wnid))
    if not classes:
        raise UserError(
            f"synset file {path} lists no classes; write one 'class_name<TAB>wnid' a line"
        )
    return classes
