"""Pure nn.Module networks. Nothing here imports Lightning or the other genscale packages."""
