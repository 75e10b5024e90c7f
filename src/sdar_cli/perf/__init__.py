"""Performance tools: the peak-memory estimate (memory.py, used by `sdar train --dry-run`) and `sdar bench`."""
