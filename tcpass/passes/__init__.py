"""Graph passes, one per file, each a function GraphModule -> GraphModule.

- `cleanup`: exported module -> plain positional graph.
- `token_axis`: analysis of where the token axis is inside a block.
- `full_step`: FULL graph = original + cache outputs.
- `cached_step`: CACHED graph = cached blocks on K tokens + cache inputs/outputs.
- `reinplace`: executor-side: CACHED cache updates written in place (K rows instead of a copy).
- `writeback`: executor-side: caches written into static buffers instead of returned.
"""
