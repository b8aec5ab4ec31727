"""Configuration: size/exp presets, the recipe and sampling dataclasses, the one table of options (fields) and
`resolve(size, exp, overrides) -> ResolvedRun`."""
