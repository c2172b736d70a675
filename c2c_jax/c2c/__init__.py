"""C2C itself: prompts and their fuse mask, token and layer alignment, the fuser, the C2C model, controls."""
