"""Models on disk: the catalog (folders, Modelfiles, aliases, context length), tokenizers, exact
detokenisation, and the demo model for the simulator."""
