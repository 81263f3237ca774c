"""Models and research systems built on jax_fastattn (see DESIGN.md)."""
