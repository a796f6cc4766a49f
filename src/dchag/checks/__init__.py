"""Tools that check a parallel layout against the single-device model (built on `parallel`, `train`,
`data` and `tasks`; nothing in those layers imports them)."""
