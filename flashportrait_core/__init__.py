"""FlashPortrait core: the method in plain PyTorch, independent of any host application."""
