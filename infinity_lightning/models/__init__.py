"""Plain ``torch.nn.Module`` building blocks (layer 1): torch only, no Lightning, no files."""
