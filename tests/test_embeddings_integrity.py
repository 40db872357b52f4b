"""Embedding cache objects are verified against their recorded sha256 when read back (real S3 server,
real MobileSAM vit_t with random weights)."""
from __future__ import annotations

import io
import logging

import pytest
import torch

from components.datasets.synthetic import make_samples
from components.sam.embeddings import EMBEDDING_SHAPE, EmbeddingCache, decode_bytes, encode_bytes
from components.sam.model import build_sam

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_damaged_embedding_object_is_recomputed_with_a_warning(store, random_vit_t, caplog):
    weights, weights_sha = random_vit_t
    model = build_sam("vit_t", weights)
    (sample,) = make_samples(1, seed=3, size=(64, 80))
    first = EmbeddingCache(model, weights_sha, store)
    assert first.ensure([sample.image_sha256], lambda i: sample.image) == {"store": 0, "computed": 1}
    good = first.from_store(sample.image_sha256)
    key = first.key(sample.image_sha256)
    recorded = store.stat(key).sha256
    # Bit rot that still decodes: a well-formed tensor of the right shape, full of NaN, under the
    # original object's recorded sha256. Unchecked, it would turn training into NaN.
    nan = encode_bytes(torch.full(EMBEDDING_SHAPE, float("nan")))
    store.client.put_object(store.config.bucket, key, io.BytesIO(nan), len(nan), metadata={"sha256": recorded})
    cache = EmbeddingCache(model, weights_sha, store)
    with caplog.at_level(logging.WARNING, logger="components.sam.embeddings"):
        got = cache.stored_or_computed(sample.image_sha256, lambda: sample.image, sample.id)
    assert cache.stats["computed"] == 1 and cache.stats["store"] == 0
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, good, atol=1e-3, rtol=0)
    assert any("sha256" in r.getMessage() and store.uri(key) in r.getMessage() for r in caplog.records)
    # The recomputed embedding replaced the damaged object.
    torch.testing.assert_close(decode_bytes(store.get_bytes(key)), good, atol=1e-3, rtol=0)


def test_embedding_on_cpu_leaves_the_model_as_it_was():
    """compute_embeddings switches the encoder to channels-last weights on CPU (faster convolutions) and
    back: the exported state must not depend on whether embeddings were computed, and the embedding
    equals the one of the usual layout."""
    from components.sam.embeddings import _conv_layout, compute_embeddings

    torch.manual_seed(0)
    model = build_sam("vit_t")
    before = {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}
    (sample,) = make_samples(1, seed=3, size=(64, 80))
    got = compute_embeddings(model, [sample.image], batch_size=1, amp=False)
    assert got.is_contiguous()
    for k, v in model.state_dict().items():
        assert v.stride() == before[k][1] and torch.equal(v, before[k][0]), k
    with torch.no_grad():
        from components.sam.transforms import preprocess_image

        plain = model.image_encoder(preprocess_image(sample.image)[0][None]).to(torch.float16).float()
    torch.testing.assert_close(got, plain, atol=1e-3, rtol=1e-3)
    with pytest.raises(RuntimeError), _conv_layout(model.image_encoder, torch.device("cpu")):
        raise RuntimeError("an encoder failure")
    assert all(v.stride() == before[k][1] for k, v in model.state_dict().items())


def test_embeddings_of_another_precision_never_share_a_key(store, random_vit_t, monkeypatch):
    """fp32, bf16 and fp16 encoders give different bytes (and bf16 embeddings train worse): the precision is in
    the key, so a bf16 embedding never stands in for an fp32 one; and a CPU encoder runs fp32 whatever the
    training's AMP."""
    from components.sam import embeddings

    model = build_sam("vit_t", random_vit_t[0])
    assert embeddings.encoder_precision(torch.device("cuda"), None) == "fp16"
    assert embeddings.encoder_precision(torch.device("cuda"), False) == "fp32"
    assert {embeddings.encoder_precision(torch.device("cpu"), amp) for amp in (None, False, True)} == {"fp32"}
    keys = {EmbeddingCache(model, random_vit_t[1], store, amp=amp).key("a" * 64) for amp in (None, False, True)}
    assert len(keys) == 1 and keys.pop().endswith(f"/embeddings/{random_vit_t[1]}/fp32/{'a' * 64}")
    monkeypatch.setattr(embeddings, "encoder_precision", lambda device, amp: "bf16")  # benchmarks' bf16 arm
    bf16 = EmbeddingCache(model, random_vit_t[1], store)
    assert bf16.precision == "bf16"
    assert bf16.key("a" * 64).endswith(f"/embeddings/{random_vit_t[1]}/bf16/{'a' * 64}")
