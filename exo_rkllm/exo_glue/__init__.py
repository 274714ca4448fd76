"""Everything that touches legacy exo's internals: the import hook, the patches, the API's node
port on exo's Node, exo detection. Nothing outside this package imports exo."""
