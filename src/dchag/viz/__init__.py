"""Pictures (matplotlib, imported only by the commands that draw)."""
