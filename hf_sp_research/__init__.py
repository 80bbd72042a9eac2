"""Research tooling built on hf_sp's public API: the recipe sweep (not part of the library)."""
