"""The training losses, one pure function of tensors per method, each in the file named for it."""
