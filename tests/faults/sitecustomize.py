"""Fault injection for tests/test_pipeline_local.py: on the PYTHONPATH of a local run's task subprocesses,
SAM_TEST_FAIL_EMBED_SHARD=<i> makes embed shard <i> fail inside its body, as a store outage or a CUDA error
would. Nothing else changes: the shard list, the other shards and finetune run the real code."""
import os

_SHARD = os.environ.get("SAM_TEST_FAIL_EMBED_SHARD")
if _SHARD is not None:
    import components.datasets.reader as _reader

    _real = _reader.shard_images

    def shard_images(manifest, shard, shards):
        if int(shard) == int(_SHARD):
            raise ConnectionError(f"injected: shard {shard} lost its object store")
        return _real(manifest, shard, shards)

    _reader.shard_images = shard_images
