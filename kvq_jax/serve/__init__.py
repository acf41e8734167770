"""kvq_jax.serve: paged quantized KV caches, a page allocator with a prefix cache, and an
engine with continuous batching, chunked prefill and speculative decoding, and data-parallel
replicas of it (one engine per device).

    engine = kvq.serve.Engine(model, kv="int8", max_batch=8, page_size=64)
    rid = engine.submit(prompt_ids, max_new_tokens=64)
    out = engine.run()            # {request id: [generated ids]}
"""

from kvq_jax.serve.allocator import OutOfPages, PageAllocator, prefix_keys
from kvq_jax.serve.engine import Engine, block_forward, speculative_generate
from kvq_jax.serve.replicas import ReplicatedEngine
from kvq_jax.serve.paged import (
    PagedKVCache,
    append_paged,
    attend_chunk_paged,
    attend_paged,
    contiguous_view,
    init_paged_cache,
    page_bytes,
    pages_needed,
    reset_paged,
    set_page_table,
)

__all__ = [
    "Engine", "OutOfPages", "PageAllocator", "PagedKVCache", "ReplicatedEngine", "block_forward", "prefix_keys", "speculative_generate", "append_paged", "attend_chunk_paged", "attend_paged", "contiguous_view", "init_paged_cache", "page_bytes",
    "pages_needed", "reset_paged", "set_page_table",
]
