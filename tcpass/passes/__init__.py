"""Graph passes, one per file; the order they run in is `tcpass.passes.pipeline.PIPELINE`.

- `cleanup`: exported module -> plain positional graph.
- `token_axis`: analysis of where the token axis is inside a block.
- `layout`: the cache layout both step graphs share, and graph plumbing.
- `skip_step`: the stack residual as a cache, and the SKIP graph.
- `full_step`: FULL graph = original + cache outputs.
- `cached_step`: CACHED graph = cached blocks on K tokens + cache inputs/outputs.
- `reinplace`: executor-side: CACHED cache updates written in place (K rows instead of a copy).
- `writeback`: executor-side: caches written into static buffers instead of returned.
- `pipeline`: the ordered list of passes, each ``(build: Build) -> None``.

The token selector (`tcpass.selectors`) contributes its caches and kept-token choice to `full_step`
and `cached_step`.
"""
