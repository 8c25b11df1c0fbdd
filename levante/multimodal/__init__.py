"""Images in prompts: loading, per-family preprocessing, and what the engine needs to place them."""
