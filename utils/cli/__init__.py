"""What the file CLIs (compress.py, decompress.py) share. A runner: it may import the registry and below."""
