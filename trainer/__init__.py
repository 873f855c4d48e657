"""How models are trained: configs, Lightning modules, callbacks and the one assembly point."""
