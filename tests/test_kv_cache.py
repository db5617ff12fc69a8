"""GrowingCache: the same keys and values as transformers' DynamicCache, appended in place."""

import torch
from transformers import DynamicCache

from chatdistill.inference.kv_cache import GrowingCache


def _step(cache, layer: int, n: int, seed: int, rows: int = 3):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(rows, 2, n, 8, generator=g), torch.randn(rows, 2, n, 8, generator=g)
    return cache.update(k, v, layer)


def test_appends_equal_dynamic_cache_and_reuse_the_buffer():
    ours, ref = GrowingCache(), DynamicCache()
    for i, n in enumerate([17, 1, 1, 1, 5] + [1] * 40):
        for layer in (0, 1):
            got, want = (
                _step(ours, layer, n, seed=10 * i + layer),
                _step(ref, layer, n, i * 10 + layer),
            )
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert ours.get_seq_length() == ref.get_seq_length() == 17 + 3 + 5 + 40
    # once grown, single-token steps write into the same storage instead of copying the cache
    before = ours.layers[0].keys.data_ptr()
    _step(ours, 0, 1, seed=999)
    assert ours.layers[0].keys.data_ptr() == before


def test_assigned_keys_and_values_replace_the_buffers():
    cache = GrowingCache()
    _step(cache, 0, 6, seed=1)
    layer = cache.layers[0]
    keys, values = layer.keys.clone(), layer.values.clone()
    # as the engine merges rows: assign keys first, then read the old values
    layer.keys = torch.cat([keys, keys])
    assert layer.values.shape == values.shape
    layer.values = torch.cat([values, values])
    k, v = _step(cache, 0, 1, seed=2, rows=6)
    assert k.shape == v.shape == (6, 2, 7, 8)
    assert torch.equal(k[:3, :, :6], keys) and torch.equal(v[3:, :, :6], values)
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert layer.keys.shape == (2, 2, 7, 8) and torch.equal(layer.values[1, :, :6], values[2])
