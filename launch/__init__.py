"""Everything that starts runs: the `genscale` command and its launchers."""
