"""Applications built on the core: sentence embeddings, search, vision, recommendation."""
