"""Stage 5, discovery methods: each finds a circuit (or scores every edge) from a patching setup."""
