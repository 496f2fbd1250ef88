"""tokentee broker."""
