"""Quality of quantized KV caches on a real model, against the bf16 cache.

* `perplexity.evaluate`: perplexity, KL(p_bf16 || p_preset) and top-1 agreement of
  next-token distributions, scoring text token by token through each cache (the
  decode path of `kvq.generate`); `perplexity.main` is ``kvq-jax eval``.
* `needle.run`: needle-in-a-haystack retrieval by greedy `kvq.generate` through each
  cache, on a grid of depth x context; `needle.plot_needle` draws the heatmaps.
"""

from kvq_jax.eval import needle, perplexity
from kvq_jax.eval.needle import plot_needle
from kvq_jax.eval.perplexity import evaluate, format_table, plot_quality

__all__ = ["evaluate", "format_table", "needle", "perplexity", "plot_needle", "plot_quality"]
