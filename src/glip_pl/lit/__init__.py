"""glip_pl.lit: the Lightning training shell (module, data module, callbacks, CLI)."""
