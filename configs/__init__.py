"""YAML configs shipped with genscale: experiment/*.yaml are short diffs over the dataclass defaults."""
