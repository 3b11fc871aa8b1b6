"""The Parquet cache: a cached load equals a fresh parse; the content hash decides re-parsing."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest
from tests.test_readers import write_cuhk_sysu, write_jpeg, write_prw

from dkd_ray.data import cache, cuhk_sysu, load_annotations, parse_cuhk_sysu, parse_prw


def assert_same_annotations(a, b):
    assert a.dataset == b.dataset and a.num_train_ids == b.num_train_ids
    for table_a, table_b in [(a.images, b.images), (a.queries, b.queries)]:
        for f in dataclasses.fields(table_a):
            x, y = getattr(table_a, f.name), getattr(table_b, f.name)
            assert x.dtype == y.dtype, f.name
            np.testing.assert_array_equal(x, y, err_msg=f.name)
    assert sorted(a.galleries) == sorted(b.galleries)
    for size in a.galleries:
        for f in dataclasses.fields(a.galleries[size]):
            x, y = getattr(a.galleries[size], f.name), getattr(b.galleries[size], f.name)
            if isinstance(x, np.ndarray):
                assert x.dtype == y.dtype, f.name
            np.testing.assert_array_equal(x, y, err_msg=f"TestG{size}.{f.name}")


def backdate(root, seconds=3600):
    """Make every file older than the racy-hash window, as on a dataset unpacked long ago."""
    past = time.time() - seconds
    for dirpath, _, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(dirpath, name), (past, past))


class ParseCounter:
    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


def test_cuhk_round_trip_equals_fresh_parse(tmp_path):
    root = write_cuhk_sysu(tmp_path / "cuhk")
    first = load_annotations("cuhk_sysu", root, cache_dir=tmp_path / "cache")
    cached = load_annotations("cuhk_sysu", root, cache_dir=tmp_path / "cache")
    assert_same_annotations(parse_cuhk_sysu(root), first)
    assert_same_annotations(parse_cuhk_sysu(root), cached)
    assert cached.root == root
    [entry] = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert {p.name for p in entry.iterdir()} >= {
        "images_train.parquet", "images_test.parquet", "queries.parquet", "gallery_2.parquet",
        "gallery_2_positives.parquet", "gallery_3.parquet", "meta.json"}


def test_prw_round_trip_equals_fresh_parse(tmp_path):
    root = write_prw(tmp_path / "prw")
    load_annotations("prw", root, cache_dir=tmp_path / "cache")
    cached = load_annotations("prw", root, cache_dir=tmp_path / "cache")
    assert_same_annotations(parse_prw(root), cached)


def test_default_cache_dir_inside_root_or_per_user(tmp_path, monkeypatch):
    root = write_prw(tmp_path / "prw", jpegs=False)
    load_annotations("prw", root)
    assert any(p.name.startswith("prw-") for p in (root / ".dkd_cache").iterdir())
    monkeypatch.setattr(cache, "_writable_dir", lambda path: ".dkd_cache" not in str(path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    other = cache.default_cache_dir(root)
    assert other.parent == tmp_path / "home" / ".cache" / "dkd_ray"
    assert other != cache.default_cache_dir(tmp_path)  # keyed by the dataset path


def test_changed_content_reparses_touch_does_not(tmp_path, monkeypatch):
    root = write_cuhk_sysu(tmp_path / "cuhk")
    backdate(root)
    counter = ParseCounter(monkeypatch, cuhk_sysu, "parse_cuhk_sysu")
    cache_dir = tmp_path / "cache"
    load_annotations("cuhk_sysu", root, cache_dir=cache_dir)
    assert counter.calls == 1

    # Unchanged: no parse, and no source file is read again (stat matches the hash index).
    index = cache.SourceHashIndex(cache_dir / cache.HASH_INDEX_FILE)
    cache.cache_key("cuhk_sysu", root, index)
    assert index.hashed_bytes == 0
    load_annotations("cuhk_sysu", root, cache_dir=cache_dir)
    assert counter.calls == 1

    # Touched, same content: re-hashed, not re-parsed.
    os.utime(root / "annotation/pool.mat")
    index = cache.SourceHashIndex(cache_dir / cache.HASH_INDEX_FILE)
    cache.cache_key("cuhk_sysu", root, index)
    assert index.hashed_bytes == (root / "annotation/pool.mat").stat().st_size
    load_annotations("cuhk_sysu", root, cache_dir=cache_dir)
    assert counter.calls == 1

    # Changed content (s1.jpg moves from the training images to the pool): parsed again.
    write_cuhk_sysu(root, pool=["s1.jpg", "s4.jpg", "s5.jpg", "s6.jpg", "s7.jpg"], jpegs=False)
    changed = load_annotations("cuhk_sysu", root, cache_dir=cache_dir)
    assert counter.calls == 2
    assert changed.images.split[0] == "test"
    assert_same_annotations(changed, parse_cuhk_sysu(root))


def test_same_size_rewrite_within_racy_window_is_detected(tmp_path):
    root = write_prw(tmp_path / "prw", jpegs=False)
    cache_dir = tmp_path / "cache"
    before = load_annotations("prw", root, cache_dir=cache_dir)
    query_file = root / "query_info.txt"
    stat = query_file.stat()
    text = query_file.read_text().replace("100 10 10 30 40", "101 10 10 30 40")
    query_file.write_text(text)
    os.utime(query_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    after = load_annotations("prw", root, cache_dir=cache_dir)
    assert before.queries.pid.tolist() == [100, 101]
    assert after.queries.pid.tolist() == [101, 101]


def test_appearing_image_makes_the_entry_stale(tmp_path):
    root = write_prw(tmp_path / "prw", jpegs=False)
    cache_dir = tmp_path / "cache"
    assert (load_annotations("prw", root, cache_dir=cache_dir).images.width == 0).all()
    write_jpeg(root / "frames/c1s1_000001.jpg", 64, 48)
    reloaded = load_annotations("prw", root, cache_dir=cache_dir)
    assert reloaded.images.width.tolist() == [64, 0, 0, 0]
    # the image folder's stats are part of the key: the new image gives a new entry
    assert len([p for p in cache_dir.iterdir() if p.name.startswith("prw-")]) == 2


def test_damaged_entry_is_rebuilt_and_no_cache_always_parses(tmp_path, monkeypatch):
    root = write_prw(tmp_path / "prw", jpegs=False)
    cache_dir = tmp_path / "cache"
    load_annotations("prw", root, cache_dir=cache_dir)
    [entry] = [p for p in cache_dir.iterdir() if p.name.startswith("prw-")]
    (entry / "queries.parquet").write_bytes(b"not parquet")
    assert load_annotations("prw", root, cache_dir=cache_dir).queries.pid.tolist() == [100, 101]

    from dkd_ray.data import prw

    counter = ParseCounter(monkeypatch, prw, "parse_prw")
    load_annotations("prw", root, cache_dir=cache_dir, use_cache=False)
    load_annotations("prw", root, cache_dir=cache_dir, use_cache=False)
    assert counter.calls == 2


def test_writing_an_existing_entry_keeps_the_first(tmp_path):
    """Two workers finishing the same parse: the second rename fails quietly, nothing leaks."""
    root = write_prw(tmp_path / "prw", jpegs=False)
    annotations = parse_prw(root)
    entry = tmp_path / "cache" / "prw-samekey"
    cache.write_entry(annotations, entry, "samekey")
    cache.write_entry(annotations, entry, "samekey")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["prw-samekey"]
    assert_same_annotations(cache.read_entry(entry, root), annotations)


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_annotations("market1501", tmp_path)


def test_concurrent_cold_loads_parse_once(tmp_path, monkeypatch):
    """Workers starting together: one parses under the lock, the others read its entry."""
    import threading

    from dkd_ray.data import prw

    root = write_prw(tmp_path / "prw", jpegs=False)
    counter = ParseCounter(monkeypatch, prw, "parse_prw")
    results = []

    def worker():
        results.append(load_annotations("prw", root, cache_dir=tmp_path / "cache"))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 3 and counter.calls == 1
    for result in results[1:]:
        assert_same_annotations(results[0], result)
